"""Test-only fault injection: a worker SIGKILLs or signals itself at a chosen point of training.

Used by the elastic-restart and preemption tests; inert unless one of these is set:

- ``LMF_TEST_KILL_AT_STEP=N``: die right after optimizer step N (before it is logged or checkpointed);
- ``LMF_TEST_KILL_DURING_SAVE=N``: die while checkpoint-N is half-written (model written, state not yet);
- ``LMF_TEST_SIGNAL_AT_STEP=N`` (+ ``LMF_TEST_SIGNAL=TERM|INT``, default TERM): send itself that signal
  right after step N (a preemption that reaches one rank only);
- ``LMF_TEST_KILL_RANK=R``: the global rank that dies or is signalled (default 0);
- ``LMF_TEST_STEP_SLEEP_S=S``: sleep S seconds after every step (gives an outside signal time to land).

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


def hooks_from_env(env=None) -> dict:
    """Training-loop callbacks (``after_step``, ``during_save``) for the hooks set in ``env``; ``{}`` when none is
    set, so real runs get the loop's no-op defaults."""
    env = os.environ if env is None else env
    names = ("LMF_TEST_KILL_AT_STEP", "LMF_TEST_KILL_DURING_SAVE", "LMF_TEST_SIGNAL_AT_STEP", "LMF_TEST_STEP_SLEEP_S")
    if not any(env.get(name) for name in names):
        return {}
    return {"after_step": lambda step: fault_point("step", step), "during_save": lambda step: fault_point("save", step)}
