"""Data parallelism for the training loop: none, DDP, or FSDP2 (``fully_shard``).

``fsdp: full_shard`` (or ``shard_grad_op``) selects FSDP2; ``deepspeed: ds_zN_config.json`` maps
ZeRO stage 2/3 onto FSDP2 sharding (stage 0/1 onto DDP) and says so in the log.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    import torch

    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


@dataclass(frozen=True)
class ParallelPlan:
    """How the loss module is wrapped: mode is 'single', 'ddp' or 'fsdp'."""

    mode: str
    reshard_after_forward: bool = True


def _fsdp_options(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    return [str(v) for v in value]


def read_deepspeed_stage(path: str) -> int:
    """ZeRO stage of a DeepSpeed JSON config (errors name the 'deepspeed' key and the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'deepspeed': file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            ds = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'deepspeed': {path!r} is not valid JSON: {exc}") from exc
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'deepspeed': {path!r} has zero_optimization.stage={stage!r}; expected 0-3")
    return int(stage)


def plan_parallelism(cfg: "LmfConfig", world_size: int, announce: bool = True) -> ParallelPlan:
    """Decide the wrapping from ``fsdp`` / ``deepspeed`` and the world size (``announce``: log the decision)."""
    t = cfg.training
    options = _fsdp_options(t.fsdp)
    if t.deepspeed and options:
        raise ConfigError("config keys 'deepspeed' and 'fsdp' are both set; choose one")
    mode, reshard = "ddp", True
    if t.deepspeed:
        stage = read_deepspeed_stage(t.deepspeed)
        if stage >= 2:
            mode, reshard = "fsdp", stage == 3
            (logger.info if announce else logger.debug)(
                "deepspeed: ZeRO stage %d from %s is mapped onto FSDP2 (fully_shard, reshard_after_forward=%s); "
                "the DeepSpeed engine is not used", stage, t.deepspeed, reshard,
            )
        else:
            (logger.info if announce else logger.debug)("deepspeed: ZeRO stage %d from %s is mapped onto DDP",
                                                        stage, t.deepspeed)
    elif options:
        unknown = [o for o in options if o not in ("full_shard", "shard_grad_op", "hybrid_shard", "offload", "auto_wrap")]
        if unknown:
            raise ConfigError(f"config key 'fsdp': unknown option(s) {', '.join(unknown)}")
        if "offload" in options:
            raise ConfigError("config key 'fsdp': 'offload' is not implemented")
        mode, reshard = "fsdp", "shard_grad_op" not in options
    if mode == "fsdp" and t.fp16:
        raise ConfigError("fp16 with FSDP sharding (fsdp / deepspeed ZeRO-2/3) has no loss scaling in lmf; use bf16: true")
    if world_size <= 1:
        if mode == "fsdp" and announce:
            logger.info("a single process: no sharding needed, training without FSDP")
        return ParallelPlan("single")
    return ParallelPlan(mode, reshard)


def decoder_layers(model) -> list["torch.nn.Module"]:
    """The repeated decoder blocks of a (possibly PEFT-wrapped) causal LM."""
    from lmf.loss import unwrap_causal_lm

    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"FSDP: cannot find the decoder layers of {type(causal_lm).__name__}")
    return list(layers)


def wrap(loss_module, plan: ParallelPlan, device: "torch.device", mixed_dtype: Optional["torch.dtype"], find_unused: Optional[bool]):
    """Move ``loss_module`` to ``device`` and wrap it per ``plan``; return the module the loop calls."""
    import torch

    if plan.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=mixed_dtype, reduce_dtype=torch.float32) if mixed_dtype else MixedPrecisionPolicy()
        for layer in decoder_layers(loss_module.model):
            fully_shard(layer, mp_policy=mp, reshard_after_forward=plan.reshard_after_forward)
        fully_shard(loss_module, mp_policy=mp, reshard_after_forward=plan.reshard_after_forward)
        loss_module.to(device)
        return loss_module
    loss_module.to(device)
    if plan.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=ids, find_unused_parameters=bool(find_unused))
    return loss_module


@contextlib.contextmanager
def gradient_sync(wrapped, plan: ParallelPlan, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that are not the last of an accumulation window."""
    if enabled or plan.mode == "single":
        yield
    elif plan.mode == "ddp":
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
