"""Fault handling for multi-process jobs: a dead or hung peer ends every rank with a clear message.

Every collective is bounded by the process group's timeout (``ddp_timeout``, set by
``runtime.init_distributed``). When a peer dies, gloo fails the next collective at once
("Connection reset by peer"); when a peer hangs, it fails after the timeout; NCCL's watchdog
aborts the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, enabled by :func:`lmf.dist.runtime.configure_error_handling`).
:func:`peer_failure_guard` turns those low-level errors into :class:`PeerLostError`, which the
CLI prints as one line and a non-zero exit code. torchrun then tears the rest of the group down.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from typing import Iterator, MutableMapping, Optional

from lmf.extras.errors import LmfError

# Fragments of the messages gloo / NCCL / the c10d store raise when a peer is gone or silent.
_PEER_GONE_PATTERNS = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "connection refused",
    "communicator was aborted",
    "nccl communicator",
    "remote process exited",
    "socket closed",
    "recvbytes",
    "sendbytes",
)
_TIMEOUT_PATTERNS = (
    "timed out",
    "timeout",
    "watchdog caught collective operation",
)


class PeerLostError(LmfError):
    """A collective failed because another rank died, hung or became unreachable."""


def _is_dist_error(exc: BaseException, names: tuple[str, ...] = ("DistError",)) -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always present where collectives run
        return False
    classes = tuple(c for c in (getattr(dist, n, None) for n in names) if c is not None)
    return bool(classes) and isinstance(exc, classes)


def classify_collective_error(exc: BaseException) -> Optional[str]:
    """``"timeout"``, ``"peer"`` or None (not a process-group failure)."""
    # gloo, NCCL and the c10d store raise RuntimeError (DistBackendError, DistNetworkError, DistStoreError);
    # plain OSErrors (an HTTP logger that cannot connect, say) are not about the process group.
    if isinstance(exc, LmfError) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if any(p in text for p in _PEER_GONE_PATTERNS):
        return "peer"
    if any(p in text for p in _TIMEOUT_PATTERNS):
        return "timeout" if _in_process_group() or _is_dist_error(exc) or "gloo" in text or "nccl" in text else None
    if _is_dist_error(exc, ("DistNetworkError", "DistStoreError")):  # not DistBackendError: that may be a plain bug
        return "peer"
    return None


def _in_process_group() -> bool:
    try:
        from lmf.dist.runtime import is_dist

        return is_dist()
    except ImportError:  # pragma: no cover
        return False


def _group_timeout_s() -> Optional[float]:
    """The collective timeout ``init_distributed`` set (``ddp_timeout``), when known."""
    from lmf.dist.runtime import group_timeout_s

    return group_timeout_s()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def peer_lost_message(kind: str, exc: BaseException, rank: Optional[int] = None, timeout_s: Optional[float] = None) -> str:
    """The one-line explanation of a failed collective."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if kind == "timeout":
        waited = f" after {timeout_s:g}s (ddp_timeout)" if timeout_s else " (ddp_timeout)"
        head = (f"rank {rank} timed out{waited} waiting for the other ranks: a peer process hung or died, "
                "or the network failed; see the first failing rank's log")
    else:
        head = (f"rank {rank} lost contact with the group: a peer process died or the network failed; "
                "see the first failing rank's log")
    return f"{head} [{type(exc).__name__}: {_short(exc)}]"


@contextlib.contextmanager
def peer_failure_guard() -> Iterator[None]:
    """Re-raise process-group failures (dead/hung peer, network) as :class:`PeerLostError`; others unchanged."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless it is a collective failure
        kind = classify_collective_error(exc)
        if kind is None:
            raise
        message = peer_lost_message(kind, exc, timeout_s=_group_timeout_s())
        _abandon_broken_group()
        raise PeerLostError(message) from exc


def _abandon_broken_group() -> None:
    """Destroy a broken gloo group now, so the process exits cleanly instead of aborting in C++ teardown."""
    try:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort: the error being reported matters more
        pass


def monitored_barrier(timeout_s: Optional[float] = None) -> None:
    """A barrier that names the ranks that did not arrive (gloo ``monitored_barrier``); plain barrier on NCCL.

    No-op without a process group. Raises :class:`PeerLostError` when a rank is missing.
    """
    if not _in_process_group():
        return
    import torch.distributed as dist

    with peer_failure_guard():
        if dist.get_backend() == "gloo":
            timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
            try:
                dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
            except RuntimeError as exc:
                if "monitoredbarrier" not in str(exc).lower():
                    raise
                detail = re.sub(r"^\[Rank \d+\]:\s*", "", _short(exc))
                rank = dist.get_rank()
                _abandon_broken_group()
                raise PeerLostError(f"rank {rank}: {detail}: those ranks died or hung; see their logs") from exc
        else:
            dist.barrier()
