"""Run a training command through Ray Train instead of torchrun: with ``USE_RAY=1`` or when the config sets
one of LLaMA-Factory's Ray keys (:data:`RAY_KEYS`).

The keys map onto Ray Train: ``ray_num_workers`` (default ``NPROC_PER_NODE x NNODES``), ``resources_per_worker``
and ``placement_strategy`` onto ``ScalingConfig``; ``ray_run_name``, ``ray_storage_path`` and
``ray_storage_filesystem`` (s3, gs/gcs through pyarrow) onto ``RunConfig``; ``ray_init_kwargs`` onto
``ray.init`` (e.g. the ``address`` of an existing cluster, a ``runtime_env``). The request is compared with the
cluster's resources before anything starts, and Ray's retries of a worker group that cannot start are bounded. Each Ray worker gets the usual
torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...) from the Ray Train context and runs
the same command as a torchrun worker; Ray has already created the torch process group (timeout = the
config's ``ddp_timeout``), which ``lmf.dist.runtime.init_distributed`` reuses. Ray is optional:
``pip install "ray[train]"``.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

from lmf.extras.errors import ConfigError, LmfError, NotAvailableError
from lmf.extras.logging import get_logger

RAY_INSTALL_HINT = 'pip install "ray[train]"'
#: Config keys that ask for Ray (LLaMA-Factory 0.9.5's RayArguments and the 0.9.2-0.9.4 ones).
RAY_KEYS = ("ray_num_workers", "ray_init_kwargs", "ray_run_name", "ray_storage_path", "ray_storage_filesystem",
            "resources_per_worker", "placement_strategy")


def config_requests_ray(raw: Mapping) -> bool:
    """True when the raw config sets a Ray key (any value)."""
    return any(key in raw and raw[key] is not None for key in RAY_KEYS)


def require_ray() -> None:
    """Raise :class:`NotAvailableError` with the install command when Ray Train is missing."""
    try:
        import ray  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise NotAvailableError(f"USE_RAY=1 (or a ray_* config key) needs Ray Train, which is not installed: "
                                f"{RAY_INSTALL_HINT} ({exc})") from exc


def ray_scaling_options(env: Mapping[str, str], cuda_available: bool, training=None) -> dict:
    """Keyword arguments of ``ray.train.ScalingConfig``: ``ray_num_workers`` workers, else ``NPROC_PER_NODE``
    (default 1) x ``NNODES``; ``resources_per_worker`` and ``placement_strategy`` from the config."""
    for key in ("NPROC_PER_NODE", "NNODES"):
        value = env.get(key)
        if value not in (None, "") and (not value.isdigit() or int(value) < 1):
            raise LmfError(f"environment variable {key}={value!r} must be a positive integer")
    per_node = int(env.get("NPROC_PER_NODE") or 1)
    nodes = int(env.get("NNODES") or 1)
    options: dict = {"num_workers": per_node * nodes, "use_gpu": bool(cuda_available)}
    if training is None:
        return options
    if training.ray_num_workers is not None:
        if training.ray_num_workers < 1:
            raise ConfigError(f"config key 'ray_num_workers' must be >= 1, got {training.ray_num_workers}")
        options["num_workers"] = training.ray_num_workers
    resources = _mapping(training.resources_per_worker, "resources_per_worker")
    if resources is not None:
        options["resources_per_worker"] = resources
        if "GPU" in resources:
            options["use_gpu"] = float(resources["GPU"]) > 0
    options["placement_strategy"] = training.placement_strategy
    return options


def ray_run_options(training, command: str) -> dict:
    """Keyword arguments of ``ray.train.RunConfig``: name and storage from the config."""
    options: dict = {"name": training.ray_run_name or f"lmf-{command}"}
    if training.ray_storage_path:
        fs = training.ray_storage_filesystem
        if fs is None:
            options["storage_path"] = os.path.abspath(training.ray_storage_path)
        else:
            import pyarrow.fs

            options["storage_path"] = training.ray_storage_path
            options["storage_filesystem"] = pyarrow.fs.S3FileSystem() if fs == "s3" else pyarrow.fs.GcsFileSystem()
    elif training.ray_storage_filesystem:
        raise ConfigError("config key 'ray_storage_filesystem' needs ray_storage_path (the bucket path)")
    return options


def _format_resources(resources: Mapping) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") or v) or "nothing"


def check_cluster_fits(scaling, cluster: Mapping[str, float], nodes: list[Mapping[str, float]]) -> None:
    """Refuse a Ray Train request the cluster cannot place (Ray would retry "worker group startup timed out"
    forever): the total of every resource, the largest node for STRICT_PACK, the node count for STRICT_SPREAD."""
    need = {k: float(v) for k, v in scaling.total_resources.items() if v}
    workers, strategy = scaling.num_workers, scaling.placement_strategy
    per_worker = _format_resources(scaling._resources_per_worker_not_none)
    asked = f"{workers} worker(s) x {{{per_worker}}} = {{{_format_resources(need)}}} ({strategy})"
    where = f"the cluster has {{{_format_resources(cluster)}}} on {len(nodes)} node(s)"
    short = [k for k, v in need.items() if v > float(cluster.get(k, 0.0)) + 1e-9]
    if strategy == "STRICT_PACK" and not short and nodes:
        short = [k for k, v in need.items() if all(v > float(n.get(k, 0.0)) + 1e-9 for n in nodes)]
        where += " (STRICT_PACK needs them on one node)"
    if strategy == "STRICT_SPREAD" and workers > len(nodes):
        short, where = short or ["nodes"], where + " (STRICT_SPREAD needs one node per worker)"
    if short:
        raise LmfError(f"Ray cannot place this run: it asks for {asked}, {where}; lower ray_num_workers (or "
                       "NPROC_PER_NODE x NNODES) or resources_per_worker, or connect to a bigger cluster "
                       "(ray_init_kwargs: {address: ...})")


def _alive_nodes(ray) -> list[dict]:
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive", True)]


#: Attempts to start the worker group (Ray's start timeout, 60 s by default, each) before the run fails.
RAY_START_ATTEMPTS = 5


def _bounded_start() -> dict:
    """A FailureConfig that bounds Ray Train's retries of a worker group that cannot start (where Ray has it)."""
    import dataclasses

    try:
        from ray.train import FailureConfig

        if "controller_failure_limit" not in {f.name for f in dataclasses.fields(FailureConfig)}:
            return {}
    except (ImportError, TypeError):  # an older Ray: no FailureConfig, or not a dataclass with that limit
        return {}
    return {"failure_config": FailureConfig(controller_failure_limit=RAY_START_ATTEMPTS)}


def _mapping(value, key: str) -> Optional[dict]:
    """A config value that is a mapping or its JSON text."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {key!r}: expected a mapping or JSON object, got {value!r}") from exc
    if not isinstance(parsed, dict):
        raise ConfigError(f"config key {key!r}: expected a mapping or JSON object, got {value!r}")
    return parsed


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
    from lmf.experiment import run_experiment

    with peer_failure_guard():
        run_experiment(list(loop_config["args"]), command=loop_config["command"])


def run_with_ray(command: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    """Run ``lmf <command> <args>`` on Ray Train's TorchTrainer; return 0 on success (raises LmfError otherwise)."""
    env = os.environ if env is None else env
    require_ray()
    from lmf.config import get_config

    training = get_config(list(args)).training  # validates the config before any worker starts
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_kwargs = _mapping(training.ray_init_kwargs, "ray_init_kwargs")
    if not ray.is_initialized():
        ray.init(**(init_kwargs or {}))
    options = ray_scaling_options(env, torch.cuda.is_available(), training)
    scaling = ScalingConfig(**options)
    try:  # not an endless "worker group startup timed out"
        check_cluster_fits(scaling, ray.cluster_resources(), _alive_nodes(ray))
    except LmfError as exc:
        if not (init_kwargs or {}).get("address"):
            raise  # the local cluster lmf started: it cannot grow
        # an existing cluster may autoscale to fit; Ray's start retries are bounded (RAY_START_ATTEMPTS)
        get_logger(__name__).warning("%s (waiting for the cluster to scale up)", exc)
    get_logger(__name__).info("launching %d Ray Train worker(s) (use_gpu=%s, %s)", options["num_workers"],
                              options["use_gpu"], options["placement_strategy"])
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"command": command, "args": list(args), "cwd": os.getcwd()},
        torch_config=TorchConfig(timeout_s=int(training.ddp_timeout)),
        scaling_config=scaling,
        run_config=RunConfig(**ray_run_options(training, command), **_bounded_start()),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in its own types
        raise LmfError(f"Ray Train run failed: {exc}") from exc
    error = getattr(result, "error", None)
    if error is not None:
        raise LmfError(f"Ray Train run failed: {error}")
    return 0
