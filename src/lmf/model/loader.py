"""Load a tokenizer and a causal LM from a local directory, with adapters for training or inference.

``load_tokenizer(model_args)`` and ``load_model(cfg, tokenizer, is_trainable, device=None)`` are the
entry points every command uses (train, chat, export, api).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Optional

from lmf.config.parser import split_list
from lmf.extras.errors import ConfigError, LmfError, NotAvailableError
from lmf.extras.logging import get_logger
from lmf.model.attention import resolve_attn_implementation
from lmf.model.checkpointing import enable_gradient_checkpointing, reentrant_checkpointing
from lmf.model.embeddings import configured_special_tokens, fit_embeddings_to_tokenizer
from lmf.model.vision import uncheckpoint_frozen_parts
from lmf.model.quantization import check_pre_quantized, prepare_quantized_for_training, quantization_config

if TYPE_CHECKING:
    import torch

    from lmf.config.args import ModelArguments
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)

_WARNED: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


def _quiet_transformers() -> None:
    """No per-load progress bars or advisory chatter from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # bitsandbytes (imported by peft when installed) offers an optional CPU kernel from the Hub at import time
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _check_model_path(model_args: "ModelArguments") -> str:
    path = model_args.model_name_or_path
    if not path:
        raise ConfigError("config key 'model_name_or_path' is required")
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ConfigError(f"config key 'model_name_or_path': {path!r} is a file, expected a model directory")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError(f"config key 'model_name_or_path': directory {path!r} does not exist")
    return path  # a hub id: from_pretrained resolves it from the local cache (or the hub when online)


def read_model_config(path: str) -> dict:
    """The raw config.json of a local model directory ({} when absent)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return {}
    with open(cfg_path, encoding="utf-8") as fh:
        return json.load(fh)


def safetensors_files(folder: str) -> list[str]:
    """The safetensors weight files of the model folder: the shards its index names, else ``model.safetensors``."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            return [os.path.join(folder, name) for name in sorted(set(json.load(fh)["weight_map"].values()))]
    return [os.path.join(folder, "model.safetensors")]


@contextlib.contextmanager
def config_json_errors(path: str):
    """A wrong-typed field of the model's config.json (transformers' strict config classes): one line naming both."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except StrictDataclassError as exc:  # its cause: "Field 'hidden_size' expected int, got str (value: '64')"
        where = os.path.join(path, "config.json") if os.path.isdir(path) else f"the config.json of {path!r}"
        why = " ".join(str(exc.__cause__ or exc).split())
        raise ConfigError(f"config key 'model_name_or_path': invalid {where}: {why}") from exc


def _trust_remote_code(model_args: "ModelArguments", path: str) -> bool:
    """trust_remote_code only when the user set it and the checkpoint actually ships custom code."""
    if not model_args.trust_remote_code:
        return False
    raw = read_model_config(path) if os.path.isdir(path) else {}
    if os.path.isdir(path) and "auto_map" not in raw:
        return False  # a stock architecture: never execute code from the directory
    return True


def load_tokenizer(model_args: "ModelArguments"):
    """AutoTokenizer from ``model_name_or_path`` (pad token defaults to eos; added tokens from the config)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    path = _check_model_path(model_args)
    try:
        with config_json_errors(path):  # the tokenizer reads config.json too
            tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=_trust_remote_code(model_args, path), use_fast=model_args.use_fast_tokenizer,
                split_special_tokens=model_args.split_special_tokens, cache_dir=model_args.cache_dir,
                revision=model_args.model_revision)
    except (OSError, ValueError) as exc:
        raise LmfError(f"cannot load the tokenizer from model_name_or_path={path!r}: {exc}") from exc
    if model_args.model_max_length:
        tokenizer.model_max_length = model_args.model_max_length
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_args.add_tokens:
        added = tokenizer.add_tokens(split_list(model_args.add_tokens))
        logger.info("added %d tokens to the tokenizer", added)
    special, _ = configured_special_tokens(model_args)
    if model_args.new_special_tokens_config and model_args.add_special_tokens:
        logger.warning("new_special_tokens_config and add_special_tokens are both set: the tokens of %s are added",
                       model_args.new_special_tokens_config)
    if special:
        added = tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
        logger.info("added %d special tokens to the tokenizer", added)
    return tokenizer


def _config_dtype(path: str) -> Optional["torch.dtype"]:
    import torch

    raw = read_model_config(path) if os.path.isdir(path) else {}
    name = raw.get("dtype") or raw.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def resolve_dtype(cfg: "LmfConfig", device: "torch.device", is_trainable: bool) -> "torch.dtype":
    """Weight dtype: bf16/fp16 when requested (training) or configured (inference) on GPU; always fp32 on CPU."""
    import torch

    t, m = cfg.training, cfg.model
    if is_trainable and cfg.finetuning.pure_bf16:  # every weight, trainable ones too, in bf16 (no fp32 master)
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NotAvailableError("pure_bf16: true but this GPU does not support bfloat16")
        if device.type == "cpu":
            _warn_once("cpu-pure-bf16", "pure_bf16 on CPU: the weights are bfloat16 (slower than float32 on most CPUs)")
        return torch.bfloat16
    if device.type == "cpu":
        if is_trainable and (t.bf16 or t.fp16):
            _warn_once("cpu-half", "%s is set but training runs on CPU: using float32", "bf16" if t.bf16 else "fp16")
        return torch.float32
    if is_trainable:
        if t.bf16:
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                raise NotAvailableError("bf16: true but this GPU does not support bfloat16; use fp16: true")
            return torch.bfloat16
        if t.fp16:
            return torch.float16
        return torch.float32
    if m.infer_dtype != "auto":
        return getattr(torch, m.infer_dtype)
    dtype = _config_dtype(m.model_name_or_path) or torch.float32
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return dtype


def auto_model_class(config):
    """``AutoModelForImageTextToText`` for a vision-language config (``vision_config``), ``AutoModelForSeq2SeqLM``
    for an audio-language one (``audio_config``: Qwen2-Audio, where transformers registers it), else
    ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    if getattr(config, "vision_config", None) is not None and type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    if getattr(config, "audio_config", None) is not None and type(config) in AutoModelForSeq2SeqLM._model_mapping:
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM


def model_class_of(path: str, trust_remote_code: bool = False):
    """The class the auto class (:func:`auto_model_class`) builds for the model at ``path`` (None if unknown)."""
    try:
        from transformers import AutoConfig

        with config_json_errors(path):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return auto_model_class(config)._model_mapping[type(config)]
    except (KeyError, OSError, ValueError):
        return None


def _from_pretrained(cfg: "LmfConfig", dtype, attn: str, device=None, on_meta: bool = False):
    from transformers import AutoConfig

    from lmf.model.rope import configure_rope

    m = cfg.model
    path = _check_model_path(m)
    trust = _trust_remote_code(m, path)
    common = dict(trust_remote_code=trust, cache_dir=m.cache_dir, revision=m.model_revision)
    try:
        with config_json_errors(path):
            config = AutoConfig.from_pretrained(path, **common)
        configure_rope(config, m.rope_scaling, m.model_max_length, path)
        auto_class = auto_model_class(config)
        if m.train_from_scratch or on_meta:  # on_meta: the shapes only; rank 0 sends the weights (init_on_rank0)
            return auto_class.from_config(config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust)
        saved_quant = (read_model_config(path).get("quantization_config") or {}) if os.path.isdir(path) else {}
        if saved_quant.get("quant_method") == "torchao":
            import torchao  # noqa: F401 - transformers' torchao quantizer sees it once imported (lmf.model.startup)
        quantized = quantization_config(cfg, dtype)
        if quantized is not None:
            if not saved_quant:
                common["quantization_config"] = quantized  # a checkpoint saved quantized brings its own
            common["device_map"] = m.quantization_device_map or {"": str(device)}
            if m.quantization_device_map == "auto":
                common["offload_folder"] = m.offload_folder  # what fits in neither GPU nor CPU memory
        return auto_class.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn, low_cpu_mem_usage=m.low_cpu_mem_usage, **common
        )
    except (OSError, ValueError) as exc:
        raise LmfError(f"cannot load a causal LM from model_name_or_path={path!r}: {exc}") from exc


def load_model(cfg: "LmfConfig", tokenizer, is_trainable: bool, device: Optional["torch.device"] = None,
               on_meta: "bool | str" = False, plan=None):
    """Load the causal LM, apply the finetuning method (training) or merge adapters (inference).

    The returned model stays on CPU unless ``device`` is given; trainable parameters are fp32
    (mixed precision keeps fp32 master weights), frozen ones use the resolved dtype. ``on_meta``: the model
    and its adapters are built on the meta device without reading the checkpoint (``init_on_rank0``: the
    trainer fills them from rank 0 once sharded); ``on_meta="parameters"``: parameters on meta, buffers real
    (``init_on_meta``: every rank fills its shards from the checkpoint and keeps its own buffers). ``plan``: the
    run's :class:`~lmf.dist.plan.ParallelPlan` (FSDP needs non-reentrant checkpointing); computed here when absent.
    """
    import torch

    if on_meta == "parameters":
        with parameters_on_meta():
            return _load_model(cfg, tokenizer, is_trainable, device, on_meta=True, plan=plan)
    if on_meta:
        with torch.device("meta"):
            return _load_model(cfg, tokenizer, is_trainable, device, on_meta=True, plan=plan)  # dtype as rank 0's
    return _load_model(cfg, tokenizer, is_trainable, device, plan=plan)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (each one moved there as it is registered, so at
    most one parameter is ever allocated) while their buffers stay real: rotary frequencies and other non-persistent
    buffers, which no checkpoint holds, are computed as usual."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load_model(cfg: "LmfConfig", tokenizer, is_trainable: bool, device: Optional["torch.device"] = None,
                on_meta: bool = False, plan=None):
    import torch

    from lmf.model.forward import set_packed_sdpa, set_padding_free
    from lmf.model.adapter import init_adapter, load_adapters_for_inference, log_param_counts

    _quiet_transformers()
    device = device if device is not None else torch.device("cpu")
    dtype = resolve_dtype(cfg, device, is_trainable)
    path = _check_model_path(cfg.model)
    local = os.path.isdir(path)
    raw_config = read_model_config(path) if local else {}
    check_pre_quantized(cfg.model, raw_config)
    model_class = model_class_of(path, _trust_remote_code(cfg.model, path)) if local else None
    attn = resolve_attn_implementation(cfg.model.flash_attn, device, dtype, model_class, raw_config)
    if cfg.model.mixture_of_depths and attn == "flash_attention_2":  # routed positions attend through a 4-D mask
        attn = "sdpa"
        logger.info("mixture_of_depths: attention through sdpa (its routed positions need a 4-D mask)")
    if is_trainable and cfg.model.shift_attn:
        from lmf.model.shift_attention import attn_implementation_for

        attn = attn_implementation_for(raw_config)
    elif cfg.model.shift_attn:
        logger.info("shift_attn applies to training; here the model attends over the whole row, as it was trained to")
    model = _from_pretrained(cfg, dtype, attn, device, on_meta=on_meta)
    logger.info("loaded %s (%s, attn=%s)", cfg.model.model_name_or_path, str(dtype).replace("torch.", ""), attn)
    fit_embeddings_to_tokenizer(cfg, model, tokenizer)
    from lmf.model.mixture_of_depths import apply_mixture_of_depths

    apply_mixture_of_depths(cfg.model.mixture_of_depths, model, path, is_trainable)
    if tokenizer is not None and getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    log_linear_attention_path(model, device)
    if is_trainable:
        model.config.use_cache = False
        if cfg.model.quantization_bit is not None:
            prepare_quantized_for_training(model)
        _apply_upcasts(cfg, model)
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(model, reentrant_checkpointing(cfg, plan), cfg.model.offload_activations)
            uncheckpoint_frozen_parts(model, cfg.finetuning)
        model = init_adapter(cfg, model)
        if cfg.finetuning.neftune_noise_alpha:
            from lmf.model.neftune import enable_neftune

            enable_neftune(model, cfg.finetuning.neftune_noise_alpha)
        model.train()
    else:
        model = load_adapters_for_inference(cfg, model)
        model.requires_grad_(False)
        model.eval()
    if cfg.model.print_param_status:
        for name, p in model.named_parameters():
            print(f"{name}: {p.dtype} {p.device} trainable={p.requires_grad}")
    log_param_counts(model)
    routed = bool(cfg.model.mixture_of_depths)  # its layers pick positions of one row: no rows of several samples
    set_padding_free(model, cfg.model.padding_free and not routed)
    set_packed_sdpa(model, cfg.model.packed_sdpa and not routed)
    if is_trainable and cfg.model.moe_aux_loss_coef:
        _enable_router_aux_loss(cfg, model)
    if cfg.model.quantization_bit is not None or on_meta:
        return model  # placed by from_pretrained (device_map), or on meta until the trainer fills it
    return model.to(device)


def _enable_router_aux_loss(cfg: "LmfConfig", model) -> None:
    """``moe_aux_loss_coef``: the decoder returns its router logits; the trainer adds the weighted loss."""
    from lmf.model.moe import experts_of
    from lmf.model.forward import decoder_of, set_router_logits, unwrap_causal_lm

    num_experts, top_k = experts_of(model.config)
    if not num_experts:
        raise ConfigError(f"config key 'moe_aux_loss_coef': {model.config.model_type} is not a mixture-of-experts "
                          "model (no routed experts in its config)")
    decoder = decoder_of(unwrap_causal_lm(model))
    if "router_logits" not in (getattr(type(decoder), "_can_record_outputs", None) or {}):
        import transformers

        raise ConfigError(f"config key 'moe_aux_loss_coef': transformers {transformers.__version__}'s "
                          f"{model.config.model_type} decoder does not return its router logits, so no auxiliary loss "
                          "can be added; upgrade transformers (5.19 returns them) or unset moe_aux_loss_coef")
    set_router_logits(model, True)
    logger.info("moe_aux_loss_coef: router load-balancing loss x %g (%d experts, top-%d), logged as aux_loss",
                cfg.model.moe_aux_loss_coef, num_experts, top_k)


def log_linear_attention_path(model, device) -> None:
    """Qwen3-Next / Qwen3.5 (gated delta rule linear attention): say whether the flash-linear-attention kernels
    run (CUDA, ``pip install 'lmf[fla]'``) or transformers' torch fallback (correct, far slower)."""
    import importlib.util

    layer_types = getattr(getattr(model, "config", None), "layer_types", None) or ()
    if "linear_attention" not in layer_types:
        return
    kernels = importlib.util.find_spec("fla") is not None and device.type == "cuda"
    if kernels:
        logger.info("linear attention: flash-linear-attention kernels (fla) on CUDA")
    else:
        logger.warning("linear attention: transformers' torch fallback of the gated delta rule (slow)%s",
                       "; pip install 'lmf[fla]' on a CUDA machine for the flash-linear-attention kernels"
                       if device.type == "cuda" else " on CPU")


#: Substrings of the names of normalisation weights (LLaMA-Factory's LAYERNORM_NAMES).
LAYERNORM_NAMES = ("norm", "ln")


def _apply_upcasts(cfg: "LmfConfig", model) -> None:
    """``upcast_layernorm``: 1-D norm weights in fp32 (as LLaMA-Factory). ``upcast_lmhead_output``: lmf's
    losses always compute the logits in fp32, whatever the head's dtype (said once in the log)."""
    import torch

    if cfg.model.upcast_layernorm:
        upcast = [name for name, p in model.named_parameters()
                  if p.ndim == 1 and any(n in name for n in LAYERNORM_NAMES) and p.dtype != torch.float32]
        for name, p in model.named_parameters():
            if name in upcast:
                p.data = p.data.to(torch.float32)
        logger.info("upcast_layernorm: %d norm weight(s) upcast to float32%s", len(upcast),
                    "" if upcast else " (the weights already are)")
    if cfg.model.upcast_lmhead_output:
        logger.info("upcast_lmhead_output: lmf's losses always compute the LM head's logits in float32")
