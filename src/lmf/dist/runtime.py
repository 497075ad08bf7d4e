"""Process-group runtime: init/teardown, rank helpers, device choice, collectives used by the trainers.

Works single-process (no process group: every helper degrades to a no-op) and under torchrun
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set): gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

from lmf.extras.logging import get_logger

logger = get_logger(__name__)

_GROUP_TIMEOUT_S: Optional[float] = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: "object"  # torch.device
    backend: Optional[str]
    writers_per_node: bool = False  # save_on_each_node: local rank 0 of every node writes output_dir (no shared fs)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes ``output_dir``: global rank 0, or with ``save_on_each_node`` the local rank 0
        of each node (each node's own copy)."""
        return self.is_local_main if self.writers_per_node else self.is_main

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def env_rank() -> int:
    """Global rank from the environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """World size from the environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def select_device(use_cpu: bool = False):
    """cuda:LOCAL_RANK when CUDA is available (and not ``use_cpu``), else cpu."""
    import torch

    if not use_cpu and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def configure_error_handling(env=None) -> None:
    """Let NCCL abort a rank whose collective failed or timed out (instead of hanging); gloo relies on the timeout.

    Sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` unless the user chose a value. Call before
    ``init_process_group``.
    """
    env = os.environ if env is None else env
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def init_distributed(timeout_s: int = 1800, backend: Optional[str] = None, use_cpu: bool = False) -> DistInfo:
    """Initialise the default process group when launched by torchrun; return this process's :class:`DistInfo`.

    ``timeout_s`` bounds every collective (``ddp_timeout``), so a dead peer makes the others fail
    instead of hanging forever.
    """
    import torch
    import torch.distributed as dist

    global _GROUP_TIMEOUT_S
    device = select_device(use_cpu)
    world_size = env_world_size()
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        configure_error_handling()
        _GROUP_TIMEOUT_S = float(max(int(timeout_s), 1))
        timeout = datetime.timedelta(seconds=_GROUP_TIMEOUT_S)
        store = restart_attempt_store(world_size, timeout)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **({"store": store, "rank": env_rank(), "world_size": world_size} if store is not None else {}),
        )
        logger.info("initialised process group: backend=%s world_size=%d", backend, world_size)
    backend = dist.get_backend() if dist.is_initialized() else None
    return DistInfo(
        rank=env_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
        backend=backend,
    )


def restart_attempt_store(world_size: int, timeout: datetime.timedelta):
    """A fresh key space in torchrun's agent store for a restarted worker group; None on the first attempt.

    After a torchrun restart the agent's TCPStore still holds the dead group's keys, so the new
    group would read the old ranks' addresses and fail to connect (pytorch/pytorch#135712).
    Prefixing the keys with the restart count gives every attempt its own namespace. Only for
    the agent store (static rendezvous, or c10d with store sharing); the launcher disables sharing
    for elastic (``RDZV_ID``) jobs, whose restart counts can differ between nodes.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=False, timeout=timeout)
    logger.info("torchrun restart %d: using a fresh rendezvous key space", restart)
    return dist.PrefixStore(f"lmf/restart_{restart}", base)


def group_timeout_s() -> Optional[float]:
    """Collective timeout (seconds) of the group this process initialised; None if it did not."""
    return _GROUP_TIMEOUT_S


def is_dist() -> bool:
    """True when a default process group exists.

    Without ``torch.distributed`` imported no group can exist: answer without importing torch (a
    data-only process, e.g. ``get_dataset`` under ``main_process_first``, then never pays for it).
    """
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Global rank 0 (or no process group)."""
    return env_rank() == 0


def barrier() -> None:
    """Barrier across all ranks; no-op without a process group."""
    if is_dist():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_process_first(local: bool = True) -> Iterator[None]:
    """Let (local) rank 0 run the block first — e.g. to build a cache — then the other ranks."""
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local else env_rank()
    if rank != 0:
        barrier()
    try:
        yield
    finally:
        if rank == 0:
            barrier()


def all_reduce_sum(tensor):
    """In-place sum across ranks (returns the tensor); identity without a process group."""
    if is_dist():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src``; identity without a process group."""
    if not is_dist():
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def writers_outcome(runtime: "DistInfo", value):
    """Every rank gets what the writers (:attr:`DistInfo.is_writer`) hold: rank 0's ``value`` (a broadcast), or with
    one writer per node the list of every writer's ``value`` in rank order (an all-gather; non-writers' left out)."""
    if not runtime.writers_per_node:
        return broadcast_object(value)
    if not is_dist():
        return [value]
    import torch.distributed as dist

    everyone: list = [None] * runtime.world_size
    dist.all_gather_object(everyone, (runtime.is_writer, value))
    return [v for is_writer, v in everyone if is_writer]


def first_error(runtime: "DistInfo", error):
    """The writers' first error (any value; None when every writer succeeded), on every rank."""
    shared = writers_outcome(runtime, error)
    if not runtime.writers_per_node:
        return shared
    return next((e for e in shared if e is not None), None)


def destroy_distributed() -> None:
    """Tear the process group down (safe to call twice)."""
    if is_dist():
        import torch.distributed as dist

        dist.destroy_process_group()
