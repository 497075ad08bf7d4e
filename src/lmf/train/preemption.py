"""Preemption-safe training: SIGTERM / SIGINT finish the current optimizer step, save a checkpoint, exit.

:class:`StopRequest` records the first SIGTERM or SIGINT a training process receives (cluster
preemption, ``kill``, Ctrl-C) instead of dying mid-step. The trainer all-reduces the request with
the step's statistics, so under torchrun every rank stops after the *same* step even when only one
of them was signalled; it then writes a complete checkpoint (atomically, as every save) and raises
:class:`TrainingInterrupted`, whose exit code is 143 (SIGTERM) or 130 (SIGINT). Relaunching the same
command resumes exactly from that checkpoint.

Repeated signals within :data:`REPEAT_GRACE_S` of the first are ignored (a Ctrl-C reaches a process
both from the terminal and from torchrun); a later second SIGINT stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

from lmf.extras.errors import LmfError

REPEAT_GRACE_S = 3.0
HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(LmfError):
    """Training stopped on a signal after saving a checkpoint; exit code 128 + signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        saved = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"training interrupted by {signal.Signals(signum).name} after step {step}; {saved}; "
                         "relaunch the same command to resume")


class StopRequest:
    """The first SIGTERM/SIGINT received while installed (main thread only; a no-op elsewhere)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            rank = os.environ.get("RANK", "0")
            # print, not logging: a handler may interrupt a logging call of this very thread
            print(f"lmf: rank {rank} received {signal.Signals(signum).name}: finishing the current step, then "
                  "saving a checkpoint and exiting", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT and now - self._first_at > REPEAT_GRACE_S:
            raise KeyboardInterrupt

    def flags(self) -> tuple[float, float]:
        """(1 if SIGTERM was received, 1 if SIGINT was): summed across ranks with the step statistics."""
        return float(self.signum == signal.SIGTERM), float(self.signum == signal.SIGINT)


def agreed_signal(sigterm_count: float, sigint_count: float) -> Optional[int]:
    """The signal every rank acts on after the all-reduce (SIGTERM wins), or None to go on."""
    if sigterm_count > 0:
        return int(signal.SIGTERM)
    if sigint_count > 0:
        return int(signal.SIGINT)
    return None
