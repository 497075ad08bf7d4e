"""DeepSpeed JSON configs, read section by section and mapped onto what lmf runs (FSDP2 or DDP).

lmf never runs the DeepSpeed engine: ``deepspeed: ds_zN_config.json`` is a description of what the user
wants (sharding, offload, batch sizes, precision, loss scaling, saving), and every section of it is either
mapped onto lmf's own engine, checked against the YAML (``"auto"`` takes the YAML's value; an explicit value
that contradicts it is an error naming both, as DeepSpeed itself refuses such mismatches), named as having
no effect (DeepSpeed's own communication-bucket tuning, which FSDP2 does its own way), or refused as not
implemented, before any model is loaded. :func:`read_deepspeed_config` returns the result; the parallelism
plan (:mod:`lmf.dist.plan`) logs its lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from lmf.extras.errors import ConfigError

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

#: zero_optimization keys that tune DeepSpeed's own buckets and communication; FSDP2 has no such knobs.
ZERO_TUNING = (
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter", "reduce_bucket_size",
    "contiguous_gradients", "round_robin_gradients", "sub_group_size", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters", "legacy_stage1",
    "memory_efficient_linear", "use_multi_rank_bucket_allreduce", "stage3_module_granularity_threshold",
    "log_trace_cache_warnings", "use_all_reduce_for_fetch_params",
)
#: zero_optimization keys that ask for something FSDP2 cannot do (refused when set to a non-default value).
ZERO_REFUSED = {
    "mics_shard_size": (-1, "MiCS sharding"), "mics_hierarchical_params_gather": (False, "MiCS sharding"),
    "zero_hpz_partition_size": (1, "ZeRO++ hierarchical partitioning"),
    "zero_quantized_weights": (False, "ZeRO++ quantized weights"),
    "zero_quantized_gradients": (False, "ZeRO++ quantized gradients"),
    "zero_quantized_nontrainable_weights": (False, "ZeRO++ quantized frozen weights"),
}
#: top-level sections that must be off (absent, false or {"enabled": false}) because lmf has no counterpart.
OFF_ONLY = {
    "amp": "NVIDIA apex AMP (use bf16: true or fp16: true)",
    "wall_clock_breakdown": "DeepSpeed's wall-clock breakdown",
    "flops_profiler": "DeepSpeed's flops profiler",
    "comms_logger": "DeepSpeed's communication logger",
    "autotuning": "DeepSpeed's autotuning",
    "elasticity": "DeepSpeed elasticity (lmf's elastic training is torchrun's: MIN_NNODES/MAX_NNODES)",
    "compression_training": "DeepSpeed compression", "data_efficiency": "DeepSpeed data efficiency",
    "curriculum_learning": "DeepSpeed curriculum learning", "progressive_layer_drop": "progressive layer drop",
    "sparse_attention": "DeepSpeed sparse attention", "pipeline": "pipeline parallelism",
    "dump_state": "DeepSpeed's state dump", "sparse_gradients": "sparse gradients",
    "prescale_gradients": "gradient prescaling",
}
FP16_SCALER_KEYS = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                    "consecutive_hysteresis")
SCHEDULERS = {"warmuplr": "constant_with_warmup", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}


@dataclass
class LossScaleSettings:
    """DeepSpeed's dynamic fp16 loss scaling (its defaults): scale 2**initial_scale_power, doubled after
    ``window`` clean steps, halved after ``hysteresis`` overflows, never below ``min_scale``."""

    initial_scale_power: int = 16
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    consecutive_hysteresis: bool = False


@dataclass
class DeepSpeedSettings:
    """What a DeepSpeed config asks of lmf, and a log line per section saying what lmf does with it."""

    path: str
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    pin_memory: bool = False
    train_batch_size: Optional[int] = None  # explicit value, checked against the world size by the plan
    loss_scale: LossScaleSettings = field(default_factory=LossScaleSettings)
    mapped: list = field(default_factory=list)      # "section: what lmf does"
    no_effect: list = field(default_factory=list)   # sections lmf has no counterpart for, harmless

    @property
    def offload(self) -> bool:
        return self.offload_optimizer or self.offload_param


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'deepspeed': file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            ds = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'deepspeed': {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(ds, dict):
        raise ConfigError(f"config key 'deepspeed': {path!r} must hold a JSON object")
    return ds


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


class _Reader:
    """Reads one config; every error names the file, the section and (where there is one) the YAML key."""

    def __init__(self, cfg: "LmfConfig", path: str, ds: dict):
        self.cfg, self.path, self.ds = cfg, path, ds

    def error(self, section: str, msg: str) -> ConfigError:
        return ConfigError(f"config key 'deepspeed' ({self.path}): {section}: {msg}")

    def refuse(self, section: str, what: str) -> ConfigError:
        return self.error(section, f"{what} is not implemented in lmf (lmf maps DeepSpeed configs onto FSDP2; "
                                   "remove the section or set it off)")

    def match(self, section: str, value: Any, yaml_key: str, yaml_value: Any) -> None:
        """``"auto"`` or equal to the YAML's value, else an error naming both."""
        if value is None or _is_auto(value):
            return
        same = (abs(float(value) - float(yaml_value)) <= 1e-12 * max(1.0, abs(float(yaml_value)))
                if isinstance(value, (int, float)) and not isinstance(value, bool) else value == yaml_value)
        if not same:
            raise self.error(section, f"{value!r} contradicts the YAML's {yaml_key}: {yaml_value!r}; set one of "
                                      "them to the other (or the DeepSpeed value to \"auto\")")


def read_deepspeed_config(cfg: "LmfConfig") -> Optional[DeepSpeedSettings]:
    """Validate ``cfg.training.deepspeed`` against the YAML and return what it maps onto (None: no config)."""
    path = cfg.training.deepspeed
    if not path:
        return None
    ds = _load(path)
    r = _Reader(cfg, path, ds)
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise r.error("zero_optimization", f"expected an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise r.error("zero_optimization.stage", f"{stage!r}; expected 0, 1, 2 or 3")
    out = DeepSpeedSettings(path=path, stage=int(stage))
    _read_top_level(r, out)
    _read_zero(r, zero, out)
    return out


def _read_top_level(r: _Reader, out: DeepSpeedSettings) -> None:
    t, ds = r.cfg.training, r.ds
    handled = {"zero_optimization"}
    r.match("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"),
            "per_device_train_batch_size", t.per_device_train_batch_size)
    r.match("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"), "gradient_accumulation_steps",
            t.gradient_accumulation_steps)
    r.match("gradient_clipping", ds.get("gradient_clipping"), "max_grad_norm", t.max_grad_norm)
    tbs = ds.get("train_batch_size")
    if tbs is not None and not _is_auto(tbs):
        out.train_batch_size = int(tbs)
    handled |= {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size"}
    out.mapped.append("batch sizes and gradient_clipping: the YAML's (\"auto\") or checked equal to it")
    _read_precision(r, out)
    handled |= {"fp16", "bf16", "optimizer", "scheduler", "data_types", "communication_data_type",
                "gradient_predivide_factor"}
    _read_optimizer_and_scheduler(r, out)
    for key in ("zero_allow_untested_optimizer", "steps_per_print", "comms_config", "monitor_config",
                "tensor_parallel", "activation_checkpointing", "aio", "checkpoint", "zero_force_ds_cpu_optimizer"):
        handled.add(key)
    _read_misc(r, out)
    for key, what in OFF_ONLY.items():
        handled.add(key)
        value = ds.get(key)
        on = value.get("enabled", True) if isinstance(value, dict) else bool(value)
        if on:
            raise r.refuse(key, what)
    unknown = sorted(k for k in ds if k not in handled and not k.startswith("_"))
    if unknown:
        raise r.refuse(", ".join(unknown), "this section")


def _read_precision(r: _Reader, out: DeepSpeedSettings) -> None:
    t, ds = r.cfg.training, r.ds
    for section, yaml_key in (("fp16", "fp16"), ("bf16", "bf16")):
        value = ds.get(section) or {}
        if not isinstance(value, dict):
            raise r.error(section, f"expected an object, got {value!r}")
        enabled = value.get("enabled", "auto")  # an absent section or key: no opinion, the YAML decides
        if not _is_auto(enabled):
            r.match(f"{section}.enabled", bool(enabled), yaml_key, bool(getattr(t, yaml_key)))
        extra = sorted(set(value) - {"enabled", *(FP16_SCALER_KEYS if section == "fp16" else ())})
        extra = [k for k in extra if not (section == "bf16" and k == "immediate_grad_update")]
        if extra:
            raise r.refuse(f"{section}.{', '.join(extra)}", "this setting")
    fp16 = ds.get("fp16") or {}
    scale = out.loss_scale
    scale.initial_scale_power = int(fp16.get("initial_scale_power", scale.initial_scale_power))
    scale.window = int(fp16.get("loss_scale_window", scale.window))
    scale.hysteresis = int(fp16.get("hysteresis", scale.hysteresis))
    scale.min_scale = float(fp16.get("min_loss_scale", scale.min_scale))
    scale.consecutive_hysteresis = bool(fp16.get("consecutive_hysteresis", False))
    if t.fp16:
        if fp16.get("loss_scale", 0) not in (0, 0.0):
            raise r.refuse("fp16.loss_scale", f"a static loss scale ({fp16['loss_scale']})")
        out.mapped.append(f"fp16: dynamic loss scaling from 2**{scale.initial_scale_power}, window {scale.window}, "
                          f"hysteresis {scale.hysteresis}, min {scale.min_scale:g}")
    else:
        out.mapped.append(f"fp16/bf16: the YAML's precision ({'bf16' if t.bf16 else 'fp32'}); fp16 loss scaling "
                          "unused")
    grad_accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if grad_accum not in (None, "fp32", "float32"):
        raise r.refuse("data_types.grad_accum_dtype", f"gradient accumulation in {grad_accum}")
    comm = ds.get("communication_data_type")
    if comm not in (None, "fp32", "float32"):
        raise r.refuse("communication_data_type", f"gradient reduction in {comm} (lmf reduces in fp32)")
    if ds.get("gradient_predivide_factor", 1.0) != 1.0:
        raise r.refuse("gradient_predivide_factor", "gradient predivision")


def _read_optimizer_and_scheduler(r: _Reader, out: DeepSpeedSettings) -> None:
    t, ds = r.cfg.training, r.ds
    opt = ds.get("optimizer")
    if opt:
        kind = str(opt.get("type", "")).lower()
        if kind not in ("adam", "adamw"):
            raise r.refuse("optimizer.type", f"the DeepSpeed optimizer {opt.get('type')!r} (lmf runs AdamW)")
        if t.optim == "sgd":
            raise r.error("optimizer.type", f"{opt.get('type')!r} contradicts the YAML's optim: sgd")
        params = opt.get("params") or {}
        for key, yaml_key in (("lr", "learning_rate"), ("eps", "adam_epsilon"), ("weight_decay", "weight_decay")):
            r.match(f"optimizer.params.{key}", params.get(key), yaml_key, getattr(t, yaml_key))
        betas = params.get("betas")
        if betas is not None and not _is_auto(betas):
            r.match("optimizer.params.betas", [float(b) for b in betas], "adam_beta1/adam_beta2",
                    [t.adam_beta1, t.adam_beta2])
        unknown = sorted(set(params) - {"lr", "eps", "weight_decay", "betas", "torch_adam", "adam_w_mode"})
        if unknown:
            raise r.refuse(f"optimizer.params.{', '.join(unknown)}", "this setting")
        out.mapped.append("optimizer: lmf's AdamW with the YAML's hyperparameters (checked equal)")
    sched = ds.get("scheduler")
    if sched:
        kind = str(sched.get("type", "")).lower()
        if kind not in SCHEDULERS:
            raise r.refuse("scheduler.type", f"the DeepSpeed scheduler {sched.get('type')!r}")
        if SCHEDULERS[kind] != t.lr_scheduler_type:
            raise r.error("scheduler.type", f"{sched.get('type')!r} is lr_scheduler_type {SCHEDULERS[kind]}, but the "
                                            f"YAML's lr_scheduler_type is {t.lr_scheduler_type}")
        explicit = sorted(k for k, v in (sched.get("params") or {}).items() if not _is_auto(v))
        if explicit:
            raise r.refuse(f"scheduler.params.{', '.join(explicit)}",
                           "an explicit schedule value (use \"auto\": the YAML's warmup and learning rate)")
        out.mapped.append(f"scheduler: lr_scheduler_type {t.lr_scheduler_type} with the YAML's warmup")


def _read_misc(r: _Reader, out: DeepSpeedSettings) -> None:
    ds = r.ds
    if ds.get("tensor_parallel"):
        raise r.refuse("tensor_parallel", "AutoTP tensor parallelism (FSDP2 shards whole parameters; lmf does not "
                                          "split layers across devices)")
    act = ds.get("activation_checkpointing") or {}
    if any(bool(v) for v in act.values()):
        raise r.refuse("activation_checkpointing", "DeepSpeed's activation checkpointing API (lmf checkpoints "
                                                   "activations with gradient_checkpointing, on by default)")
    monitors = {k: v for k, v in (ds.get("monitor_config") or {}).items() if isinstance(v, dict) and v.get("enabled")}
    if monitors:
        raise r.refuse(f"monitor_config.{', '.join(sorted(monitors))}", "DeepSpeed's monitor (use report_to)")
    comms = ds.get("comms_config") or {}
    if any(bool(v) for v in comms.values()):
        raise r.refuse("comms_config", "DeepSpeed's communication logging")
    for key in ("zero_allow_untested_optimizer", "steps_per_print", "comms_config", "monitor_config", "aio",
                "checkpoint", "activation_checkpointing"):
        if key in ds:
            out.no_effect.append(key)
    if ds.get("zero_force_ds_cpu_optimizer") and not _offload_device(ds.get("zero_optimization") or {},
                                                                     "offload_optimizer"):
        out.no_effect.append("zero_force_ds_cpu_optimizer")


def _offload_device(zero: dict, key: str) -> Optional[str]:
    section = zero.get(key)
    if key == "offload_optimizer" and section is None and zero.get("cpu_offload"):
        return "cpu"  # the deprecated boolean form
    if not section:
        return None
    device = str(section.get("device", "none")).lower()
    return None if device == "none" else device


def _read_zero(r: _Reader, zero: dict, out: DeepSpeedSettings) -> None:
    stage = out.stage
    for key, (default, what) in ZERO_REFUSED.items():
        if zero.get(key, default) not in (default, None, 0) or (key == "mics_shard_size" and zero.get(key, -1) > 0):
            raise r.refuse(f"zero_optimization.{key}", what)
    pins = []
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero, key)
        if device is None:
            continue
        if device != "cpu":
            raise r.refuse(f"zero_optimization.{key}.device", f"offload to {device!r} (only \"cpu\" is)")
        section = zero.get(key) or {}
        if float(section.get("ratio", 1.0)) != 1.0:
            raise r.refuse(f"zero_optimization.{key}.ratio", "partial offload")
        if stage < 2 or (key == "offload_param" and stage < 3):
            raise r.error(f"zero_optimization.{key}", f"needs ZeRO stage {3 if key == 'offload_param' else '2 or 3'}"
                                                      f" (the config has stage {stage}), as in DeepSpeed")
        setattr(out, key, True)
        pins.append(bool(section.get("pin_memory", False)))
    out.pin_memory = bool(pins) and all(pins)
    gather = zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("stage3_gather_fp16_weights_on_model_save"))
    if stage == 3:
        out.mapped.append("stage3_gather_16bit_weights_on_model_save: lmf always saves full, gathered weights"
                          + (" (asked false: saved full all the same)" if gather is False else ""))
    known = {"stage", "offload_optimizer", "offload_param", "cpu_offload", "stage3_gather_16bit_weights_on_model_save",
             "stage3_gather_fp16_weights_on_model_save", *ZERO_TUNING, *ZERO_REFUSED}
    unknown = sorted(set(zero) - known)
    if unknown:
        raise r.refuse(f"zero_optimization.{', '.join(unknown)}", "this setting")
    tuning = sorted(set(zero) & set(ZERO_TUNING))
    if tuning:
        out.no_effect.append(f"zero_optimization.{{{', '.join(tuning)}}} (DeepSpeed's bucket/communication tuning; "
                             "FSDP2 schedules its own)")
