"""Test-only fault injection: a worker SIGKILLs or signals itself at a chosen point of training, or fakes a
mismatched node. lmf never reads these variables: :func:`install` plugs the checks into the training loop's hooks
(:func:`lmf.train.state.install_hooks`) and the environment fingerprint (:data:`lmf.dist.fingerprint.FINGERPRINT_HOOKS`)
of a process. The tests run every process with ``lmf/testing/site`` on ``PYTHONPATH`` (``tests/conftest.py``), whose
``sitecustomize`` calls :func:`install` when one of these is set, so torchrun's workers get them too:

- ``LMF_TEST_KILL_AT_STEP=N``: die right after optimizer step N (before it is logged or checkpointed);
- ``LMF_TEST_KILL_DURING_SAVE=N``: die while checkpoint-N is half-written (model written, state not yet);
- ``LMF_TEST_SIGNAL_AT_STEP=N`` (+ ``LMF_TEST_SIGNAL=TERM|INT``, default TERM): send itself that signal
  right after step N (a preemption that reaches one rank only);
- ``LMF_TEST_KILL_RANK=R``: the global rank that dies or is signalled (default 0);
- ``LMF_TEST_STEP_SLEEP_S=S``: sleep S seconds after every step (gives an outside signal time to land);
- ``LMF_FINGERPRINT_OVERRIDE`` (a JSON object, e.g. ``'{"torch": "9.9"}'``): merged into this process's
  environment fingerprint (a node with other versions).

Only the first attempt dies: torchrun sets ``TORCHELASTIC_RESTART_COUNT`` > 0 on restarts, so the
restarted group trains through. Never set these in real runs.
"""

from __future__ import annotations

import os
import signal
import sys
import time

_ENV_BY_POINT = {"step": "LMF_TEST_KILL_AT_STEP", "save": "LMF_TEST_KILL_DURING_SAVE", "signal": "LMF_TEST_SIGNAL_AT_STEP"}


def should_die(point: str, step: int, env=None) -> bool:
    """True when this process is the one configured to die at ``point`` of ``step`` on this attempt."""
    env = os.environ if env is None else env
    target = env.get(_ENV_BY_POINT[point])
    if not target or int(target) != step:
        return False
    if int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return False
    return int(env.get("RANK", "0")) == int(env.get("LMF_TEST_KILL_RANK", "0"))


def fault_point(point: str, step: int) -> None:
    """Kill this process with SIGKILL (no cleanup, like an OOM kill), or signal it, if the test hooks say so."""
    if should_die(point, step):
        print(f"lmf test hook: rank {os.environ.get('RANK', '0')} killing itself at {point} {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "step":
        if should_die("signal", step):
            name = "SIG" + os.environ.get("LMF_TEST_SIGNAL", "TERM").upper().removeprefix("SIG")
            print(f"lmf test hook: rank {os.environ.get('RANK', '0')} sending itself {name} at step {step}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), getattr(signal, name))
        delay = float(os.environ.get("LMF_TEST_STEP_SLEEP_S") or 0)
        if delay > 0:
            time.sleep(delay)


#: The variables that turn fault injection on (any of them set: :func:`install` is worth calling).
VARIABLES = ("LMF_TEST_KILL_AT_STEP", "LMF_TEST_KILL_DURING_SAVE", "LMF_TEST_SIGNAL_AT_STEP", "LMF_TEST_STEP_SLEEP_S",
             "LMF_FINGERPRINT_OVERRIDE")
OVERRIDE_ENV = "LMF_FINGERPRINT_OVERRIDE"


def fingerprint_override(fingerprint: dict) -> dict:
    """``fingerprint`` with ``$LMF_FINGERPRINT_OVERRIDE`` merged in (read at each call)."""
    import json

    from lmf.extras.errors import LmfError
    from lmf.extras.logging import get_logger

    raw = os.environ.get(OVERRIDE_ENV)
    if not raw:
        return fingerprint
    try:
        override = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LmfError(f"{OVERRIDE_ENV} must be a JSON object, got {raw!r}: {exc}") from exc
    if not isinstance(override, dict):
        raise LmfError(f"{OVERRIDE_ENV} must be a JSON object, got {raw!r}")
    get_logger(__name__).warning("%s is set (testing only): fingerprint overridden with %s", OVERRIDE_ENV, override)
    return {**fingerprint, **{str(k): str(v) for k, v in override.items()}}


def install() -> None:
    """Plug the checks above into this process's training hooks and fingerprint (each reads the environment when
    it runs, so the variables may be set later, as a test's monkeypatch does)."""
    from lmf.dist.fingerprint import FINGERPRINT_HOOKS
    from lmf.train.state import TrainHooks, install_hooks

    install_hooks(TrainHooks(after_step=lambda step: fault_point("step", step),
                             during_save=lambda step: fault_point("save", step)))
    if fingerprint_override not in FINGERPRINT_HOOKS:
        FINGERPRINT_HOOKS.append(fingerprint_override)
