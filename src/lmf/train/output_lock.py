"""One run per ``output_dir``: a lock held for the run's whole life.

Global rank 0 of a job takes an exclusive, non-blocking ``flock`` on ``output_dir/.lmf-run.lock`` before
anything in the folder is read or written, and writes who holds it (host, pid, start time, command) into the
file. The kernel drops the lock when the process dies (kill -9 included), so a crashed run never blocks its
relaunch; a second run stops at once (exit 2) naming the holder. Every other rank learns the outcome by
broadcast, so the whole job (every node) holds one lock. Only the holder may remove a ``.tmp-*`` save left by
an interrupted run (:func:`lmf.train.resume.apply_resume_plan` runs under the lock).

The file is removed (under the lock) when the run ends; an ``output_dir`` the lock had to create is removed
again if the run left nothing in it, so a run that fails early leaves the folder as it found it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
from typing import TYPE_CHECKING, Iterator, Optional

from lmf.extras.errors import ConfigError, LmfError, everywhere

if TYPE_CHECKING:
    from lmf.dist.runtime import DistInfo

LOCK_NAME = ".lmf-run.lock"


class OutputDirBusy(ConfigError):
    """Another live run holds the ``output_dir`` lock."""


class OutputDirLock:
    """An acquired lock (see :func:`acquire`); :meth:`release` drops it and removes the lock file."""

    def __init__(self, output_dir: str, fd: int, created_dir: bool):
        self.output_dir, self.path, self._fd, self._created_dir = output_dir, os.path.join(output_dir, LOCK_NAME), fd, created_dir

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter re-checks the inode and retries on a new file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.output_dir)  # only if the run left it empty


def holder_description(path: str) -> str:
    """``host H, pid P, started T (command)`` from a lock file, or a plain phrase when it is unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        return (f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')} "
                f"({info.get('command', '?')})")
    except (OSError, ValueError):
        return "a process that has not written its details yet"


def acquire(output_dir: str) -> OutputDirLock:
    """Take the lock of ``output_dir`` (creating the folder if needed) or raise :class:`OutputDirBusy`."""
    import fcntl

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"config key 'output_dir': {output_dir!r} is a file, not a directory")
    created = not os.path.isdir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise LmfError(f"cannot create output_dir {output_dir!r}: {exc.strerror or exc}") from None
    path = os.path.join(output_dir, LOCK_NAME)
    for _ in range(10):  # the holder may unlink the file between our open and our flock: retry on the new file
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LmfError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirBusy(
                f"output_dir {output_dir!r} is in use by another lmf run: {holder_description(path)}; wait for it to "
                f"end or choose another output_dir (the lock dies with its process; if that host is gone and "
                f"its file system kept the lock, remove {path})"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise LmfError(f"cannot lock {path}: {exc.strerror or exc} (does this file system support flock?)") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
            if same:
                _write_holder(fd)
        except FileNotFoundError:
            same = False
        except OSError as exc:  # a full disk or quota: the holder's details cannot be written
            OutputDirLock(output_dir, fd, created).release()
            raise LmfError(f"cannot write the lock file {path}: {exc.strerror or exc}") from None
        if same:
            return OutputDirLock(output_dir, fd, created)
        os.close(fd)
    raise LmfError(f"cannot lock {path}: it keeps being replaced")


def _write_holder(fd: int) -> None:
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["lmf"] + sys.argv[1:])[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)


@contextlib.contextmanager
def hold_output_dir(output_dir: str, runtime: "DistInfo") -> Iterator[Optional[OutputDirLock]]:
    """Hold ``output_dir``'s lock for the block: global rank 0 takes it (with ``save_on_each_node``, the local rank
    0 of each node, in its own ``output_dir``), every rank learns the outcome (an error is raised on all ranks, so
    no rank of a refused job waits for the others)."""
    from lmf.dist.runtime import first_error

    lock, error = None, None
    if runtime.is_writer:
        try:
            lock = acquire(output_dir)
        except LmfError as exc:
            error = (isinstance(exc, ConfigError), str(exc))
    error = first_error(runtime, error)
    if error is not None:
        raise everywhere((OutputDirBusy if error[0] else LmfError)(error[1]))
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
