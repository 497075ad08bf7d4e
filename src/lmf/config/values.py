"""One config value on its own: coerced to its key's type, then checked against the key's ``choices`` and its
range (:data:`BOUNDS`). Errors name the key, the value and what is allowed; the parser
(:mod:`lmf.config.parser`) adds where the key was given.

This module must stay import-light (stdlib only): ``lmf help`` imports the parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Optional, Union

from lmf.extras.errors import ConfigError

#: The natural range of every numeric key that has one, checked by the parser on each key it is given (an unset
#: Optional key, null, passes): ">= 1", "> 0", or an interval such as "[0, 1)". -1 stays allowed where it is a
#: sentinel (max_steps: train by epochs; pissa_iter: the exact SVD). The text is what the error message shows.
BOUNDS: dict[str, str] = {
    **dict.fromkeys((
        "loss_chunk_size", "model_max_length", "vllm_maxlen", "vllm_max_lora_rank", "image_max_pixels",
        "video_max_pixels", "video_maxlen", "audio_sampling_rate", "cutoff_len", "buffer_size", "preprocessing_batch_size", "max_samples",
        "eval_num_beams", "lora_rank", "lora_alpha", "galore_rank", "galore_update_interval", "apollo_rank",
        "apollo_update_interval", "early_stopping_steps", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "global_batch_size", "dp_size", "logging_steps", "ddp_timeout", "ray_num_workers",
        "num_beams", "max_length", "ddp_bucket_cap_mb", "torch_empty_cache_steps", "dataloader_prefetch_factor",
        "profiler_active_steps"),
        ">= 1"),
    **dict.fromkeys((
        "moe_aux_loss_coef", "image_min_pixels", "video_min_pixels", "preprocessing_num_workers", "val_size", "oft_rank",
        "oft_block_size", "loraplus_lr_embedding", "pref_ftx", "simpo_gamma", "kto_chosen_weight", "kto_rejected_weight",
        "badam_start_block", "learning_rate", "weight_decay", "warmup_steps", "eval_steps", "save_steps", "seed", "data_seed",
        "save_total_limit", "dataloader_num_workers", "max_checkpoint_wait", "top_k", "num_train_epochs", "eval_delay",
        "pref_bco_weight",
        "profiler_wait_steps", "profiler_warmup_steps", "profiler_repeat", "eaft_alpha", "asft_alpha"),
        ">= 0"),
    **dict.fromkeys((
        "export_size", "video_fps", "loraplus_lr_ratio", "neftune_noise_alpha", "pref_beta", "galore_scale",
        "apollo_scale", "adam_epsilon", "repetition_penalty"), "> 0"),
    **dict.fromkeys(("lora_dropout", "module_dropout", "adam_beta1", "adam_beta2", "label_smoothing_factor"), "[0, 1)"),
    **dict.fromkeys(("warmup_ratio", "badam_update_ratio", "top_p"), "[0, 1]"),
    **dict.fromkeys(("badam_verbose", "temperature"), "[0, 2]"),
    **dict.fromkeys(("max_steps", "pissa_iter", "badam_switch_interval"), ">= -1"),
    "vllm_gpu_util": "(0, 1]", "ld_alpha": "(0, 1]", "dpo_label_smoothing": "[0, 0.5)", "malloc_mmap_threshold_mb": "[0, 32]",
}


def check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    """``value`` (not None) of config key ``key`` (field ``f``) coerced to its type; ConfigError when it is not of
    that type, not one of its choices or out of its range."""
    coerced = _coerce(key, value, f.type)
    _check_choices(key, coerced, f)
    _check_bounds(key, coerced)
    return coerced


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    if isinstance(tp, str):  # postponed annotations
        tp = eval(tp, {**vars(typing), **{"Optional": Optional, "Union": Union}})  # noqa: S307 - our own literals
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {allowed}")
    if value is None:
        raise ConfigError(f"config key {key!r}: a value is required (got null)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    if tp in (dict, list):
        if isinstance(value, str) and tp is dict:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, tp):
            return value
        raise ConfigError(f"config key {key!r}: expected a {tp.__name__}, got {value!r}")
    return value


def _check_choices(key: str, value: Any, f: dataclasses.Field) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"config key {key!r}: {value!r} is not allowed; choose one of: {shown}")


def _within(value: float, spec: str) -> bool:
    """Whether ``value`` is in the range ``spec`` of :data:`BOUNDS` (">= 1", "> 0", "[0, 1)")."""
    if not math.isfinite(value):
        return False
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        return (low <= value if spec[0] == "[" else low < value) and (value <= high if spec[-1] == "]" else value < high)
    op, bound = spec.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def _check_bounds(key: str, value: Any) -> None:
    spec = BOUNDS.get(key)
    if spec is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and not _within(value, spec):
        shown = f"in {spec}" if spec[0] in "[(" else spec
        raise ConfigError(f"config key {key!r}: {value!r} is out of range (must be {shown})")


#: optimizer -> the optim_args keys it takes and how each is read (transformers' names; sgd's are transformers' own,
#: AdamW's those of torch.optim.AdamW that transformers leaves out)
OPTIM_ARGS: dict[str, dict[str, type]] = {
    "sgd": {"momentum": float, "dampening": float, "nesterov": bool},
    "adamw": {"amsgrad": bool, "maximize": bool},
    "bitsandbytes": {},
}

#: transformers' bitsandbytes AdamW names -> (bits of the optimizer state, paged state)
BNB_ADAMW: dict[str, tuple[int, bool]] = {
    "adamw_bnb_8bit": (8, False), "adamw_8bit": (8, False), "paged_adamw_8bit": (8, True),
    "paged_adamw_32bit": (32, True),
}


def parse_optim_args(text: Optional[str], optim: str) -> dict[str, Any]:
    """``optim_args`` ('key=value,key=value') as keyword arguments of ``optim``'s torch optimizer; ConfigError on a
    malformed pair, a key that optimizer does not take, or a value that is not a number / boolean."""
    if not text:
        return {}
    table = OPTIM_ARGS["sgd" if optim == "sgd" else "bitsandbytes" if optim in BNB_ADAMW else "adamw"]
    out: dict[str, Any] = {}
    for pair in text.replace(" ", "").split(","):
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"config key 'optim_args': {pair!r} is not key=value (e.g. 'momentum=0.9,nesterov=true')")
        if key == "weight_decay":  # transformers passes it, but every parameter group sets its own
            raise ConfigError("config key 'optim_args': weight_decay is the config key weight_decay in lmf (which "
                              "keeps biases and norms undecayed); set that instead")
        if key not in table:
            raise ConfigError(f"config key 'optim_args': {key!r} is not an argument of optim {optim} (it takes "
                              f"{', '.join(table) or 'none'})")
        if table[key] is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"config key 'optim_args': {key}={raw!r} is not a boolean")
            out[key] = raw.lower() in ("true", "1", "yes")
        else:
            try:
                out[key] = float(raw)
            except ValueError:
                raise ConfigError(f"config key 'optim_args': {key}={raw!r} is not a number") from None
    return out


#: liger_kernel_config's switches: the module kernels lmf asks liger to patch in (its defaults apply when unset)
LIGER_MODULE_KERNELS = ("rope", "swiglu", "rms_norm", "geglu", "layer_norm")
#: every switch lmf accepts: the module kernels, the fused loss, and the plain cross-entropy (never: no full logits)
LIGER_SWITCHES = (*LIGER_MODULE_KERNELS, "fused_linear_cross_entropy", "cross_entropy")
