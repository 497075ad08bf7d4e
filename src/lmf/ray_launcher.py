"""Run a training command through Ray Train (``USE_RAY=1``) instead of torchrun.

Each Ray worker gets the usual torchrun-style environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ...) from the Ray Train context and calls the same ``run_exp`` as a torchrun worker;
Ray has already created the torch process group (timeout = the config's ``ddp_timeout``), which
``lmf.dist.runtime.init_distributed`` reuses. Ray is optional: ``pip install "ray[train]"``.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from lmf.extras.errors import LmfError, NotAvailableError
from lmf.extras.logging import get_logger

RAY_INSTALL_HINT = 'pip install "ray[train]"'


def require_ray() -> None:
    """Raise :class:`NotAvailableError` with the install command when Ray Train is missing."""
    try:
        import ray  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise NotAvailableError(f"USE_RAY=1 needs Ray Train, which is not installed: {RAY_INSTALL_HINT} ({exc})") from exc


def ray_scaling_options(env: Mapping[str, str], cuda_available: bool) -> dict:
    """Keyword arguments of ``ray.train.ScalingConfig``: ``NPROC_PER_NODE`` workers (default 1) x ``NNODES``."""
    for key in ("NPROC_PER_NODE", "NNODES"):
        value = env.get(key)
        if value not in (None, "") and (not value.isdigit() or int(value) < 1):
            raise LmfError(f"environment variable {key}={value!r} must be a positive integer")
    per_node = int(env.get("NPROC_PER_NODE") or 1)
    nodes = int(env.get("NNODES") or 1)
    return {"num_workers": per_node * nodes, "use_gpu": bool(cuda_available)}


def _worker_environment(context) -> dict[str, str]:
    """torchrun-style rank variables for one Ray Train worker."""
    return {
        "RANK": str(context.get_world_rank()),
        "WORLD_SIZE": str(context.get_world_size()),
        "LOCAL_RANK": str(context.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "NODE_RANK": str(context.get_node_rank() if hasattr(context, "get_node_rank") else 0),
    }


def _ray_worker(loop_config: dict) -> None:
    """What every Ray worker runs: set rank variables, go back to the driver's cwd, run the command.

    Nothing here logs before the rank variables are set: lmf's logger reads ``RANK`` once.
    """
    import ray.train

    os.environ.update(_worker_environment(ray.train.get_context()))
    os.chdir(loop_config["cwd"])  # Ray may start workers in a trial directory; config paths are relative to the user's cwd
    from lmf.dist.faults import peer_failure_guard
    from lmf.train.workflow import run_exp

    with peer_failure_guard():
        run_exp(list(loop_config["args"]), command=loop_config["command"])


def _ddp_timeout(args: Sequence[str]) -> Optional[int]:
    from lmf.config import get_config

    return int(get_config(list(args)).training.ddp_timeout)


def run_with_ray(command: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    """Run ``lmf <command> <args>`` on Ray Train's TorchTrainer; return 0 on success (raises LmfError otherwise)."""
    env = os.environ if env is None else env
    require_ray()
    timeout_s = _ddp_timeout(args)  # also validates the config before any worker starts
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    options = ray_scaling_options(env, torch.cuda.is_available())
    get_logger(__name__).info("launching %d Ray Train worker(s) (use_gpu=%s)", options["num_workers"], options["use_gpu"])
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"command": command, "args": list(args), "cwd": os.getcwd()},
        torch_config=TorchConfig(timeout_s=timeout_s),
        scaling_config=ScalingConfig(**options),
        run_config=RunConfig(name=f"lmf-{command}"),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in its own types
        raise LmfError(f"Ray Train run failed: {exc}") from exc
    error = getattr(result, "error", None)
    if error is not None:
        raise LmfError(f"Ray Train run failed: {error}")
    return 0
