"""The parallelism plan of a run, read from the config alone: none, DDP, or FSDP2 (and how).

``fsdp: full_shard`` (or ``shard_grad_op``) selects FSDP2; ``hybrid_shard`` (``hybrid_shard_zero2``)
shards within a node and replicates across nodes on a 2-D device mesh (HSDP); ``auto_wrap`` is what
lmf always does (every decoder layer is its own FSDP unit). ``fsdp_config`` takes
``transformer_layer_cls_to_wrap`` (checked against the model), ``reshard_after_forward``,
``activation_checkpointing``, ``fsdp_version`` (2) and lmf's ``hybrid_shard_size`` (processes per
shard group; default: the processes of one node); any other key is refused.
``deepspeed: ds_zN_config.json`` maps ZeRO stage 1/2/3 onto FSDP2 sharding (stage 0 onto DDP) and CPU
offload onto FSDP2's ``CPUOffloadPolicy``; every section is read (:mod:`lmf.config.deepspeed`) and the log
says what became of each. Wrapping the model per plan is :mod:`lmf.train.parallel`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from lmf.config.deepspeed import DeepSpeedSettings, read_deepspeed_config
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


def _fsdp_options(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    return [str(v) for v in value]


@dataclass(frozen=True)
class ParallelPlan:
    """How the loss module is wrapped: mode is 'single', 'ddp' or 'fsdp'; ``shard_size`` (HSDP) is the size
    of the shard groups (the ranks replicate across groups); ``layer_classes`` the classes to wrap."""

    mode: str
    reshard_after_forward: bool = True
    shard_size: Optional[int] = None
    layer_classes: tuple = ()
    offload: bool = False       # FSDP2 CPUOffloadPolicy (DeepSpeed offload_optimizer / offload_param: cpu)
    pin_memory: bool = False
    from_rank0: bool = False    # init_on_rank0: only rank 0 read the checkpoint; the others get their shards from it
    from_checkpoint: bool = False  # init_on_meta: every rank reads its own shards from the checkpoint
    deepspeed: Optional[DeepSpeedSettings] = field(default=None, compare=False)  # the DeepSpeed JSON it maps


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap")
FSDP_CONFIG_KEYS = ("transformer_layer_cls_to_wrap", "reshard_after_forward", "activation_checkpointing",
                    "fsdp_version", "hybrid_shard_size")


def read_fsdp_config(value) -> dict:
    """``fsdp_config`` as a dict (a mapping, a JSON string or a JSON file path); ``fsdp_`` prefixes dropped
    (as transformers does); unknown keys refused."""
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        text = value
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as fh:
                text = fh.read()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config key 'fsdp_config': {value!r} is neither a JSON file nor JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'fsdp_config': expected a mapping, got {value!r}")
    out = {(k[len("fsdp_"):] if k.startswith("fsdp_") and k != "fsdp_version" else k): v for k, v in value.items()}
    unknown = sorted(k for k in out if k not in FSDP_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"config key 'fsdp_config': {', '.join(unknown)} not implemented in lmf "
                          f"(implemented: {', '.join(FSDP_CONFIG_KEYS)})")
    if out.get("fsdp_version") not in (None, 2, "2"):
        raise ConfigError(f"config key 'fsdp_config': fsdp_version {out['fsdp_version']!r}: lmf runs FSDP2 only")
    return out


def _deepspeed_plan(cfg: "LmfConfig", world_size: int, announce: bool) -> tuple[str, bool, Optional[DeepSpeedSettings]]:
    """Mode and resharding for a DeepSpeed config (:mod:`lmf.config.deepspeed`); logs every section's fate."""
    ds = cfg.deepspeed if cfg.deepspeed is not None else read_deepspeed_config(cfg)
    t = cfg.training
    if ds.train_batch_size is not None:
        total = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
        if ds.train_batch_size != total:
            raise ConfigError(
                f"config key 'deepspeed' ({ds.path}): train_batch_size {ds.train_batch_size} contradicts the YAML's "
                f"per_device_train_batch_size x gradient_accumulation_steps x processes = "
                f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} x {world_size} = {total}")
    if ds.stage == 0:
        mode, reshard, how = "ddp", True, "ZeRO-0 -> DDP (nothing sharded)"
    else:
        mode, reshard = "fsdp", ds.stage == 3
        how = {1: "ZeRO-1 -> FSDP2 fully_shard without resharding after forward (ZeRO-2: optimizer state and "
                  "gradients sharded, at least what ZeRO-1 saves)",
               2: "ZeRO-2 -> FSDP2 fully_shard, reshard_after_forward=False (optimizer state and gradients sharded)",
               3: "ZeRO-3 -> FSDP2 fully_shard, reshard_after_forward=True (parameters, gradients and optimizer "
                  "state sharded)"}[ds.stage]
    lines = [how]
    if ds.offload:
        asked = " + ".join(k for k in ("offload_optimizer", "offload_param") if getattr(ds, k))
        lines.append(f"{asked} (cpu{', pinned' if ds.pin_memory else ''}) -> FSDP2 CPUOffloadPolicy"
                     f"(pin_memory={ds.pin_memory}): parameters, gradients and optimizer state live on CPU "
                     "between uses, the optimizer steps on CPU"
                     + ("" if ds.offload_param else " (FSDP2 offloads parameters together with the optimizer)"))
    lines += ds.mapped
    log = logger.info if announce else logger.debug
    log("deepspeed: %s is mapped onto lmf's engine (the DeepSpeed engine is not used):\n  %s", ds.path,
        "\n  ".join(lines))
    if ds.no_effect and announce and os.environ.get("RANK", "0") == "0":
        logger.warning("deepspeed: %s: no effect in lmf: %s", ds.path, "; ".join(ds.no_effect))
    return mode, reshard, ds


def plan_parallelism(cfg: "LmfConfig", world_size: int, announce: bool = True) -> ParallelPlan:
    """Decide the wrapping from ``fsdp`` / ``deepspeed`` and the world size (``announce``: log the decision)."""
    t = cfg.training
    options = _fsdp_options(t.fsdp)
    if t.deepspeed and options:
        raise ConfigError("config keys 'deepspeed' and 'fsdp' are both set; choose one")
    mode, reshard, ds = "ddp", True, None
    if t.deepspeed:
        mode, reshard, ds = _deepspeed_plan(cfg, world_size, announce)
    elif options:
        unknown = [o for o in options if o not in FSDP_OPTIONS]
        if unknown:
            raise ConfigError(f"config key 'fsdp': unknown option(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(FSDP_OPTIONS)}")
        if "offload" in options:
            raise ConfigError("config key 'fsdp': 'offload' is not implemented")
        sharding = [o for o in options if o not in ("auto_wrap", "offload")]
        if len(sharding) > 1:
            raise ConfigError(f"config key 'fsdp': choose one sharding strategy, got {', '.join(sharding)}")
        if "auto_wrap" in options and announce:
            logger.info("fsdp: auto_wrap: every decoder layer is its own FSDP unit (lmf always wraps so)")
        mode, reshard = "fsdp", not ({"shard_grad_op", "hybrid_shard_zero2"} & set(options))
    extra = read_fsdp_config(t.fsdp_config)
    if extra and mode != "fsdp":
        raise ConfigError("config key 'fsdp_config' needs FSDP sharding (fsdp: full_shard, ...)")
    if "reshard_after_forward" in extra:
        reshard = bool(extra["reshard_after_forward"])
    if "activation_checkpointing" in extra and bool(extra["activation_checkpointing"]) != bool(t.gradient_checkpointing):
        raise ConfigError("config keys 'fsdp_config.activation_checkpointing' and 'gradient_checkpointing' disagree")
    hybrid = any(o.startswith("hybrid_shard") for o in options)
    shard_size = extra.get("hybrid_shard_size")
    if shard_size is not None and not hybrid:
        raise ConfigError("config key 'fsdp_config.hybrid_shard_size' needs fsdp: hybrid_shard")
    layer_classes = extra.get("transformer_layer_cls_to_wrap") or ()
    layer_classes = tuple(c.strip() for c in layer_classes.split(",")) if isinstance(layer_classes, str) \
        else tuple(layer_classes)
    if mode == "fsdp" and world_size > 1 and cfg.model.quantization_bit is not None:
        raise ConfigError("config key 'quantization_bit' with FSDP sharding (fsdp / deepspeed ZeRO-2/3) is not "
                          "implemented in lmf: QLoRA trains with one process or DDP")
    if mode == "fsdp" and t.fp16:
        raise ConfigError("fp16 with FSDP sharding (fsdp / deepspeed ZeRO-1/2/3) has no loss scaling in lmf; use "
                          "bf16: true")
    offload = bool(ds and ds.offload)
    sharded = (mode == "fsdp" and world_size > 1) or offload  # one process trains unsharded unless it offloads
    _check_optimizer_parallelism(cfg.finetuning, t.optim, sharded, world_size)
    if t.save_on_each_node and sharded:
        raise ConfigError("config key 'save_on_each_node' under FSDP sharding (fsdp, or a DeepSpeed ZeRO-2/3 config) "
                          "is not implemented in lmf: the full state is gathered on global rank 0 only; train with "
                          "DDP, or write to a filesystem every node shares")
    if offload and cfg.model.quantization_bit is not None:
        raise ConfigError("config keys 'quantization_bit' and 'deepspeed' offload do not combine")
    from_rank0 = bool(cfg.model.init_on_rank0) and mode == "fsdp" and world_size > 1 and shard_size is None
    if cfg.model.init_on_rank0 and not from_rank0 and announce:
        logger.info("init_on_rank0: applies to FSDP sharding on several processes; here every rank loads the model")
    from_checkpoint = bool(cfg.model.init_on_meta) and mode == "fsdp" and world_size > 1 and shard_size is None
    if cfg.model.init_on_meta and not from_checkpoint and announce:
        logger.info("init_on_meta: applies to FSDP sharding (not hybrid) on several processes; here the model loads "
                    "as usual")
    if world_size <= 1 and not offload:
        if mode == "fsdp" and announce:
            logger.info("a single process: no sharding needed, training without FSDP")
        return ParallelPlan("single", deepspeed=ds)
    if hybrid:
        shard_size = int(shard_size or os.environ.get("LOCAL_WORLD_SIZE") or world_size)
        if shard_size < 1 or world_size % shard_size:
            raise ConfigError(f"fsdp: hybrid_shard: {world_size} processes cannot form shard groups of {shard_size}")
        if announce:
            logger.info("fsdp: hybrid sharding (HSDP) on a %d x %d device mesh: parameters sharded over %d process(es), "
                        "replicated %d time(s)", world_size // shard_size, shard_size, shard_size,
                        world_size // shard_size)
    return ParallelPlan(mode, reshard, shard_size if hybrid else None, layer_classes, offload,
                        bool(ds and ds.pin_memory), from_rank0, from_checkpoint, ds)


def _check_optimizer_parallelism(ft, optim: str, sharded: bool, world_size: int) -> None:
    """GaLore/APOLLO/BAdam/Adam-mini/Muon and bitsandbytes' AdamW (``optim``) work on whole, plain weight matrices:
    one process or DDP, never FSDP shards (``sharded``); the layerwise variants and BAdam (it switches requires_grad,
    which DDP's reducer cannot follow) need one."""
    from lmf.config.rules.methods import OPTIMIZER_SWITCHES
    from lmf.config.values import BNB_ADAMW

    if optim in BNB_ADAMW and sharded:
        raise ConfigError(f"config key 'optim': {optim} with FSDP sharding or offload (fsdp / deepspeed ZeRO-2/3) is "
                          "not implemented (bitsandbytes' optimizers take whole, plain tensors); use DDP (no fsdp, "
                          "ZeRO-0/1) or optim: adamw_torch")
    on = [k for k in OPTIMIZER_SWITCHES if getattr(ft, k, False)]
    if not on:
        return
    if sharded:
        raise ConfigError(f"config key {on[0]!r} with FSDP sharding or offload (fsdp / deepspeed ZeRO-2/3) is not "
                          "implemented: the optimizer needs whole weight matrices; use DDP (no fsdp, ZeRO-0/1)")
    layerwise = [k for k in ("galore_layerwise", "apollo_layerwise") if getattr(ft, k, False)]
    if world_size > 1 and (layerwise or ft.use_badam):
        key = layerwise[0] if layerwise else "use_badam"
        raise ConfigError(f"config key {key!r} with {world_size} processes is not implemented (as in LLaMA-Factory "
                          "without DeepSpeed): train with one process")
