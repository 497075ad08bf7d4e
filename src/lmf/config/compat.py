"""LLaMA-Factory compatibility of the config keys: what lmf refuses, warns about, renames or maps.

Every key of LLaMA-Factory 0.9.5 (:data:`lmf.config.lf_keys.LF_KEYS`) is known to lmf: it is one of
lmf's own keys (``lmf.config.args``), or an LLaMA-Factory-only key. Rules for the latter
(:func:`check_lf_only_key`): LLaMA-Factory's default value is accepted (the feature is off); any other
value is an error saying the feature is not implemented (never "unknown key"), unless a mapping
(:data:`VALUE_MAPPINGS`) turns it into lmf keys.

This module must stay import-light (stdlib only): ``lmf help`` imports it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from lmf.config.lf_keys import LF_KEYS
from lmf.extras.errors import ConfigError

def _status(kind: str) -> dict[str, str]:
    """key -> reason for every field of lmf's argument groups whose metadata has ``kind``."""
    from dataclasses import fields

    from lmf.config.args import ARG_GROUPS

    return {f.name: f.metadata[kind] for cls in ARG_GROUPS.values() for f in fields(cls) if kind in f.metadata}


#: key -> reason (field metadata ``unsupported``). Setting one of lmf's own keys to anything but its default
#: is an error.
UNSUPPORTED: dict[str, str] = _status("unsupported")
#: finetuning types that exist in LLaMA-Factory but not (yet) in lmf.
UNSUPPORTED_FINETUNING_TYPES: dict[str, str] = {}
#: key -> why it is ignored (field metadata ``no_effect``). A warning is printed when set to a non-default value.
NO_EFFECT: dict[str, str] = _status("no_effect")
#: LLaMA-Factory-only keys whose value is harmless to accept with a warning (why, in the message).
LF_NO_EFFECT: dict[str, str] = {
    "hf_hub_token": "lmf runs offline",
    "ms_hub_token": "lmf runs offline",
    "om_hub_token": "lmf runs offline",
    "hub_token": "lmf runs offline",
    "include_num_input_tokens_seen": "lmf always counts the input tokens (tokens_seen in trainer_state.json)",
    "average_tokens_across_devices": "lmf always averages the loss over every label token of every rank",
    "skip_memory_metrics": "lmf does not collect transformers' memory metrics",
    "log_level": "lmf logs at INFO on rank 0",
    "log_level_replica": "lmf logs on rank 0 only",
    "logging_nan_inf_filter": "lmf logs the loss as computed",
    "log_on_each_node": "lmf logs on rank 0 only",
    "local_rank": "torchrun sets each process's rank (LOCAL_RANK)",
    "length_column_name": "group_by_length measures the tokenized lengths itself",
    "sortish_sampler": "transformers applies it to its legacy Seq2SeqDataset only, never to LLaMA-Factory's "
                       "datasets (group_by_length sorts by length)",
    "generation_max_length": "LLaMA-Factory's prediction always passes max_new_tokens or max_length, which "
                             "transformers uses instead (set those)",
    "eval_accumulation_steps": "lmf's evaluation sums the loss and accuracy per batch and keeps no predictions",
    "batch_eval_metrics": "lmf's evaluation metrics are summed batch by batch already",
    "eval_do_concat_batches": "lmf's evaluation keeps no predictions to concatenate",
    "eval_use_gather_object": "lmf's evaluation all-reduces sums and gathers no objects",
    "include_for_metrics": "lmf computes its own metrics (loss, compute_accuracy) and takes no compute_metrics",
    "enable_jit_checkpoint": "lmf always checkpoints on SIGTERM / SIGINT after the current step and exits "
                             "(lmf.train.preemption); relaunching resumes from it",
    "restore_callback_states_from_checkpoint": "lmf always restores the early-stopping and best-model state "
                                               "(trainer_state.json) on resume",
}
#: LLaMA-Factory aliases and renamed keys -> lmf key.
ALIASES: dict[str, str] = {
    "evaluation_strategy": "eval_strategy",
    "use_kv_cache": "use_cache",
    "use_liger_kernel": "enable_liger_kernel",
}


def _map_gc_kwargs(value: Any) -> dict[str, Any]:
    """``gradient_checkpointing_kwargs: {use_reentrant: false}`` -> ``use_reentrant_gc: false``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'gradient_checkpointing_kwargs': expected a mapping, got {value!r}")
    unknown = sorted(set(value) - {"use_reentrant"})
    if unknown:
        raise ConfigError(f"config key 'gradient_checkpointing_kwargs': {', '.join(unknown)} not implemented "
                          "(only use_reentrant)")
    return {"use_reentrant_gc": bool(value["use_reentrant"])} if "use_reentrant" in value else {}


def _map_layer_cls(value: Any) -> dict[str, Any]:
    """``fsdp_transformer_layer_cls_to_wrap`` (transformers) -> ``fsdp_config.transformer_layer_cls_to_wrap``."""
    return {"fsdp_config": {"transformer_layer_cls_to_wrap": value}} if value else {}


def _map_v1_kernels(value: Any) -> dict[str, Any]:
    """``use_v1_kernels: true`` -> what v1's ``kernel_config: auto`` does: LLaMA-Factory's v1 kernels are Ascend NPU
    kernels, so nothing applies on CUDA or CPU (said in the log)."""
    if not value:
        return {}
    from lmf.config.v1 import apply_kernel_names

    out: dict[str, Any] = {}
    apply_kernel_names(["auto"], out, key="use_v1_kernels")
    return out


def _map_unsloth_gc(value: Any) -> dict[str, Any]:
    """``use_unsloth_gc`` (LLaMA-Factory's own copy of unsloth's gradient checkpointing, which keeps each layer's
    checkpointed input in CPU memory) -> ``offload_activations`` with gradient checkpointing."""
    return {"offload_activations": True, "gradient_checkpointing": True} if value else {}


def _map_generation_num_beams(value: Any) -> dict[str, Any]:
    """``generation_num_beams`` -> ``eval_num_beams`` (LLaMA-Factory: eval_num_beams, or else this)."""
    return {"eval_num_beams": value} if value is not None else {}


def _map_sampling_strategy(value: Any) -> dict[str, Any]:
    """``train_sampling_strategy``: random (the default), sequential (``disable_shuffling``) or group_by_length
    (``group_by_length``)."""
    mapped = {"random": {}, "sequential": {"disable_shuffling": True}, "group_by_length": {"group_by_length": True}}
    if value in mapped:
        return mapped[value]
    if value == "batch_rebalance":
        raise ConfigError("config key 'train_sampling_strategy': batch_rebalance is not implemented in lmf; "
                          "batching_strategy: dynamic_batching balances the tokens of each micro-batch instead")
    raise ConfigError(f"config key 'train_sampling_strategy': {value!r} is not one of random, sequential, "
                      "group_by_length, batch_rebalance")


#: accelerate's settings (transformers' accelerator_config) -> what lmf always does
_ACCELERATOR_BEHAVIOUR = {
    "split_batches": (False, "per_device_train_batch_size is each process's own micro-batch"),
    "dispatch_batches": (None, "each process reads its own share of the data"),
    "even_batches": (True, "every process gets the same number of micro-batches (the last share wraps around)"),
    "use_seedable_sampler": (True, "the order is always seeded (data_seed)"),
    "non_blocking": (False, "host-to-device copies are synchronous"),
    "gradient_accumulation_kwargs": (None, "gradient_accumulation_steps is the only accumulation setting"),
    "use_configured_state": (False, "lmf sets up its own process group"),
}


def _map_accelerator_config(value: Any) -> dict[str, Any]:
    """``accelerator_config``: accepted where each setting is what lmf does anyway (it has no accelerate)."""
    if value is None:
        return {}
    if isinstance(value, str):
        import json

        try:
            with open(value, encoding="utf-8") as fh:
                value = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key 'accelerator_config': cannot read the JSON file {value!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'accelerator_config': expected a mapping or a JSON file, got {value!r}")
    for key, setting in value.items():
        if key not in _ACCELERATOR_BEHAVIOUR:
            raise ConfigError(f"config key 'accelerator_config.{key}': unknown (one of "
                              f"{', '.join(_ACCELERATOR_BEHAVIOUR)})")
        lmf_value, behaviour = _ACCELERATOR_BEHAVIOUR[key]
        if setting != lmf_value and not (lmf_value is None and setting in ({}, False)):
            raise ConfigError(f"config key 'accelerator_config.{key}': {setting!r} is not implemented in lmf, which "
                              f"has no accelerate: {behaviour} (only {lmf_value!r} is accepted)")
    return {}


def _map_parallelism_config(value: Any) -> dict[str, Any]:
    """``parallelism_config`` (accelerate's ParallelismConfig): dp_shard_size -> ``fsdp: full_shard``, with
    dp_replicate_size -> ``hybrid_shard`` (HSDP) of that shard size, replicas only -> DDP; their product is
    ``dp_size`` (checked against the processes); tensor, context and sequence parallelism are refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'parallelism_config': expected a mapping (dp_replicate_size, dp_shard_size, "
                          f"tp_size, cp_size, sp_size), got {value!r}")
    known = {"dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size", "cp_backend", "sp_backend"}
    for key, size in value.items():
        if key not in known:
            raise ConfigError(f"config key 'parallelism_config.{key}' is not implemented in lmf (it takes "
                              f"{', '.join(sorted(known))})")
        if key.endswith("_size") and size is not None and (not isinstance(size, int) or size < 1):
            raise ConfigError(f"config key 'parallelism_config.{key}': expected a positive integer, got {size!r}")
    refused = {"tp_size": ("tensor parallelism", "; lmf shards parameters with FSDP2 (dp_shard_size)"),
               "cp_size": ("context parallelism", ""), "sp_size": ("sequence parallelism", "")}
    for key, (what, instead) in refused.items():
        if (value.get(key) or 1) > 1:
            raise ConfigError(f"config key 'parallelism_config.{key}': {what} is not implemented in lmf{instead}")
    shard, replicas = value.get("dp_shard_size") or 1, value.get("dp_replicate_size") or 1
    if shard == 1:
        return {"dp_size": replicas} if "dp_replicate_size" in value else {}
    if replicas == 1:
        return {"fsdp": "full_shard", "dp_size": shard}
    return {"fsdp": "hybrid_shard", "fsdp_config": {"hybrid_shard_size": shard}, "dp_size": shard * replicas}


#: LLaMA-Factory-only key -> function(value) -> lmf keys it stands for.
VALUE_MAPPINGS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "gradient_checkpointing_kwargs": _map_gc_kwargs,
    "fsdp_transformer_layer_cls_to_wrap": _map_layer_cls,
    "use_v1_kernels": _map_v1_kernels,
    "generation_num_beams": _map_generation_num_beams,
    "train_sampling_strategy": _map_sampling_strategy,
    "accelerator_config": _map_accelerator_config,
    "parallelism_config": _map_parallelism_config,
    "use_unsloth_gc": _map_unsloth_gc,
}

#: keys of LLaMA-Factory main's Megatron backends (mcore_adapter under USE_MCA=1, Megatron Bridge; its
#: ``megatron/`` and ``megatron_bridge/`` examples), refused by name rather than as unknown keys
MEGATRON_KEYS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel",
    "bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion", "cross_entropy_loss_fusion",
    "gradient_accumulation_fusion", "use_distributed_optimizer", "overlap_param_gather", "overlap_grad_reduce",
    "moe_grouped_gemm", "moe_token_dispatcher_type", "moe_layer_recompute", "recompute_granularity",
    "recompute_method", "recompute_num_layers", "mixed_precision", "use_packed_sequences",
    "megatron_pretrained_checkpoint", "export_hf_on_finish", "extra_config",
})
MEGATRON_REFUSAL = ("configures the Megatron backend of LLaMA-Factory (mcore_adapter or Megatron Bridge: tensor, "
                    "pipeline and expert parallelism in Megatron-Core), which lmf does not implement; lmf trains "
                    "with DDP or FSDP2 (its `fsdp` and `deepspeed` configs map onto FSDP2): remove the Megatron keys")

#: LLaMA-Factory argument class (or key prefix) -> the feature its keys configure.
_GROUP_FEATURES = {
    "QuantizationArguments": "on-the-fly quantization (QLoRA)",
    "ProcessorArguments": "multimodal (image, video, audio) input",
    "ExportArguments": "GPTQ quantized export: GPTQ quantizes on a CUDA GPU only (transformers and optimum stop "
                       "with 'A GPU is needed to quantize model'; LLaMA-Factory's too), so lmf, which runs on CPU, "
                       "does not offer it; for a quantized model on CPU, export_gguf: q8_0 writes an 8-bit GGUF for "
                       "llama.cpp / Ollama",
    "VllmArguments": "passing extra vLLM engine arguments",
    "SGLangArguments": "the SGLang inference backend (see infer_backend: sglang)",
    "KTransformersArguments": "KTransformers",
    "OFTArguments": "OFT",
    "ProfilerArguments": "the torch profiler",
    "Fp8Arguments": "FP8 training",
    "transformers": "this transformers TrainingArguments option",
}
_KEY_FEATURES = {
    "ppo_": "PPO", "reward_model": "PPO",
    "ref_model_quantization_bit": "a quantized reference model", "loraplus_": "LoRA+",
    "use_mca": "Megatron-Core training", "hyper_parallel": "hyper-parallel training", "use_dft_loss": "the DFT loss",
    "asft": "the ASFT loss", "eaft": "the EAFT loss",
    "use_unsloth": "unsloth: its kernels run on NVIDIA GPUs only (Triton, CUDA); lmf's fused LoRA, chunked loss and "
                   "activation offload (use_unsloth_gc) cover its memory savings",
    "moe_aux_loss_coef": "the MoE auxiliary loss",
    "offload_folder": "disk offload of model weights",
    "adapter_folder": "adapter folders",
    "hub_": "pushing to the Hugging Face Hub, which is not possible offline",
    "trackio_static_space_id": "a static Trackio Space pushed to the Hugging Face Hub after training (lmf does not "
                               "push to the Hub; trackio_space_id syncs the run to a live Space)",
    "preserve_thinking": "preserve_thinking",
}


def feature_of(key: str) -> str:
    """What an LLaMA-Factory-only key configures (for the "not implemented" message)."""
    for prefix, feature in _KEY_FEATURES.items():
        if key.startswith(prefix) or prefix in key:
            return feature
    group = LF_KEYS[key][1] if key in LF_KEYS else "transformers"
    return _GROUP_FEATURES.get(group, f"the LLaMA-Factory option {key!r}")


def _same(value: Any, default: Any) -> bool:
    if value == default:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return False
    try:
        return float(value) == float(default)
    except (TypeError, ValueError):
        return str(value) == str(default)


def check_lf_only_key(key: str, value: Any, source: str) -> tuple[Optional[str], dict[str, Any]]:
    """For an LLaMA-Factory-only ``key``: (warning or None, lmf keys it maps to). Raises ConfigError when the
    value asks for a feature lmf does not implement."""
    if key in VALUE_MAPPINGS:
        return None, VALUE_MAPPINGS[key](value)
    default = LF_KEYS[key][0]
    if _same(value, default):
        return None, {}
    if key in LF_NO_EFFECT:
        return f"config key {key!r} has no effect in lmf: {LF_NO_EFFECT[key]}", {}
    raise ConfigError(f"{source}: config key {key!r} is accepted for LLaMA-Factory compatibility but not "
                      f"implemented in lmf ({feature_of(key)}; only its default {default!r} is accepted)")


def is_lf_only_key(key: str) -> bool:
    return key in LF_KEYS or key in VALUE_MAPPINGS


#: how lmf handles an LLaMA-Factory key (:func:`lf_key_handling`)
HANDLINGS = ("lmf key", "renamed", "mapped", "no effect", "not implemented")


def handling_of(key: str) -> tuple[str, str]:
    """How lmf handles an LLaMA-Factory key: (one of :data:`HANDLINGS`, the detail: the lmf key it is read as, what
    the mapping does, why it has no effect, or what is not implemented). ``not implemented``: any value but
    LLaMA-Factory's default stops the run (an LF-only key without a mapping, or an lmf key marked unsupported)."""
    from lmf.config.parser import KEY_INDEX

    if key in ALIASES:
        return "renamed", ALIASES[key]
    if key in VALUE_MAPPINGS:
        return "mapped", (VALUE_MAPPINGS[key].__doc__ or "").strip()
    if key in KEY_INDEX:
        if key in UNSUPPORTED:
            return "not implemented", UNSUPPORTED[key]
        return ("no effect", NO_EFFECT[key]) if key in NO_EFFECT else ("lmf key", "")
    if key in LF_NO_EFFECT:
        return "no effect", LF_NO_EFFECT[key]
    return "not implemented", feature_of(key)


def lf_key_handling() -> dict[str, tuple[str, str]]:
    """Every key of LLaMA-Factory 0.9.5 -> :func:`handling_of` it."""
    return {key: handling_of(key) for key in sorted(LF_KEYS)}
