"""``lmf COMMAND ARGS`` for tests, inside the calling process: the CLI's own path (the launcher's command dispatch,
:func:`lmf.launcher.guarded`'s exit codes and one-line errors) without a new interpreter, whose imports of torch,
transformers, peft and datasets take 5-10 s of a 2-core CI machine per call.

:func:`run_lmf` returns what :func:`subprocess.run` would (``returncode``, ``stdout``, ``stderr``: the command's
prints, its ``lmf`` log lines and Python warnings). A run that launches processes (``FORCE_TORCHRUN``,
``NPROC_PER_NODE`` > 1, Ray) or injects a fault (an ``LMF_TEST_*`` variable of :mod:`lmf.testing.faults`: a signal,
a kill, a full disk) goes to a real subprocess, as does any run with ``in_process=False``. The environment
overrides in ``env_extra`` hold for the call only; ``cwd`` is entered for it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from typing import Optional

#: Variables every test run of lmf gets (one thread per process, no hub access, no tokenizer thread pool).
BASE_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_LAUNCHING = ("FORCE_TORCHRUN", "USE_RAY")


def _launches_processes(env: dict) -> bool:
    from lmf.extras.logging import is_truthy

    return any(is_truthy(env.get(k)) for k in _LAUNCHING) or int(env.get("NPROC_PER_NODE") or 1) > 1


def _injects_faults(env_extra: dict) -> bool:
    return any(k.startswith("LMF_TEST_") or k == "LMF_FINGERPRINT_OVERRIDE" for k in env_extra)


def run_lmf(*args: str, env_extra: Optional[dict] = None, cwd: Optional[str] = None, timeout: int = 900,
            in_process: bool = True) -> subprocess.CompletedProcess:
    """``lmf *args`` with ``env_extra`` on top of this process's environment (``FORCE_TORCHRUN`` removed unless
    ``env_extra`` sets it)."""
    env = dict(os.environ, **BASE_ENV)
    env.pop("FORCE_TORCHRUN", None)
    env.update(env_extra or {})
    if not in_process or _launches_processes(env) or _injects_faults(env_extra or {}):
        return subprocess.run([sys.executable, "-m", "lmf", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
    return _in_process(list(args), env, cwd)


@contextlib.contextmanager
def _environment(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _working_dir(path: str):  # contextlib.chdir is Python 3.11's
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


@contextlib.contextmanager
def _captured_logs(stream: io.StringIO):
    """The ``lmf`` logger's lines into ``stream`` as its own handler formats them (its stderr handler, bound to the
    stream of the process's first logger call, is muted meanwhile)."""
    from lmf.extras.logging import get_logger

    get_logger()
    root = logging.getLogger("lmf")
    saved = list(root.handlers)
    handler = logging.StreamHandler(stream)
    if saved:
        handler.setFormatter(saved[0].formatter)
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved


def _in_process(argv: list[str], env: dict, cwd: Optional[str]) -> subprocess.CompletedProcess:
    from lmf.extras import logging as lmf_logging
    from lmf.launcher import guarded, run_command

    lmf_logging._ONCE.clear()  # "once per process" messages: this run is a new process's
    command = argv.pop(0) if argv else "help"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environment(env))
        if cwd:
            stack.enter_context(_working_dir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(_captured_logs(err))
        try:
            rc = guarded(run_command, command, argv)
        except SystemExit as exc:  # argparse's usage errors, sys.exit in a command
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
    return subprocess.CompletedProcess(["lmf", command, *argv], rc, out.getvalue(), err.getvalue())
