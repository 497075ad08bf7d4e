"""The torchrun worker entry point: ``python -m lmf.worker <command> [config.yaml] [key=value ...]``.

What :func:`lmf.torchrun.relaunch_with_torchrun` starts on every rank. It runs the command as the CLI does
(:func:`lmf.launcher.run_command`), with a dead or hung peer turned into one line (:mod:`lmf.dist.faults`), writes
its exit code where the launcher reads it (torchrun itself only says that a worker failed), and leaves without the
interpreter's C++ teardown.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from lmf.config.stages import TRAIN_COMMANDS
from lmf.launcher import guarded, run_command
from lmf.torchrun import EXIT_DIR_ENV


def main(argv: Optional[list[str]] = None) -> None:
    """Worker entry point (what torchrun runs): ``<command> [config.yaml] [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "sft"
    if argv and argv[0] in TRAIN_COMMANDS:
        command = argv.pop(0)
    elif argv and not argv[0].lower().endswith((".yaml", ".yml", ".json")) and "=" not in argv[0]:
        print(f"lmf worker: unknown training command {argv[0]!r}", file=sys.stderr)
        _report_exit_code(2)
        sys.exit(2)
    # an error every rank raises alike (a stop, a broadcast decision): the node's local rank 0 prints it, once
    code = guarded(run_worker_command, command, argv, quiet_shared=os.environ.get("LOCAL_RANK", "0") != "0")
    _report_exit_code(code)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit a finished worker as the interpreter would (non-daemon threads joined, exit handlers: loggers, trackers),
    then without the C++ teardown.

    A library's background thread torn down at interpreter exit can abort a worker whose work is done
    ("terminate called without an active exception"); torchrun would then kill the peers that are still
    writing. The result was reported already, so the worker leaves with ``os._exit``.
    """
    import atexit
    import threading

    for thread in threading.enumerate():  # what interpreter shutdown does first: wait for non-daemon threads
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _report_exit_code(code: int) -> None:
    """Tell the launcher this worker's exit code (torchrun itself only says that a worker failed)."""
    exit_dir = os.environ.get(EXIT_DIR_ENV)
    if not exit_dir or not os.path.isdir(exit_dir):
        return
    try:
        with open(os.path.join(exit_dir, f"rank-{os.environ.get('RANK', '0')}"), "w", encoding="utf-8") as fh:
            fh.write(str(code))
    except OSError:
        pass


def run_worker_command(command: str, args: list[str]) -> int:
    """``run_command`` in a torchrun worker: a dead or hung peer becomes a one-line PeerLostError."""
    from lmf.dist.faults import peer_failure_guard

    with peer_failure_guard():
        return run_command(command, args)


if __name__ == "__main__":
    main()
