"""LLaMA-Factory v1 configs: recognised by their keys and translated onto lmf's (v0) keys, so that one
implementation runs both schemas.

A config is v1 when it has a key only v1 has (``model``, ``train_dataset``, ``micro_batch_size``, the plugin
blocks ...); a v1 config with a key only v0 has (``model_name_or_path``, ``dataset``, ``stage`` ...) is an
error naming both. :data:`V1_KEYS` is the whole schema (LLaMA-Factory's v1 ``ModelArguments``,
``DataArguments``, ``TrainingArguments``, ``SampleArguments`` and their plugin blocks); ``lmf help config --v1``
prints it with what each key becomes. What lmf cannot do (context parallelism, expert parallelism, DCP
checkpoints, NPU kernels) is refused by name; what v1 does as a no-op here is said in the log.

v1's own defaults differ from v0's and are kept: bf16 on, constant learning rate without warmup, AdamW with
torch's weight decay 0.01, no accumulation unless ``global_batch_size`` asks for it, the tokenizer's own chat
template (``template: auto``).
"""

from __future__ import annotations

from typing import Any, Optional

from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

#: v1 key -> what it becomes in lmf (the help text of ``lmf help config --v1``).
V1_KEYS: dict[str, str] = {
    "model": "model_name_or_path",
    "model_class": "llm: a causal LM (cls: the reward model of `lmf rm`; other: refused)",
    "trust_remote_code": "trust_remote_code",
    "flash_attn": "flash_attn (flash_attention_2: FA2 where usable, else sdpa, said in the log)",
    "template": "template (v1 0.9.5; default: the tokenizer's own chat template)",
    "init_config": "init_on_default; init_on_rank0: init_on_rank0 (only rank 0 reads the checkpoint); init_on_meta: "
                   "refused",
    "peft_config": "lora: finetuning_type lora + r, lora_alpha, lora_dropout, target_modules, use_rslora, use_dora, "
                   "modules_to_save, adapter_name_or_path (+ export_dir, export_size, infer_dtype for merge); "
                   "freeze: finetuning_type freeze + freeze_*; absent: full",
    "kernel_config": "auto: nothing on CUDA/CPU (v1 applies NPU kernels only), said in the log; liger_kernel: "
                     "enable_liger_kernel; flash-linear-attention: lmf's fla path when installed",
    "quant_config": "bnb/auto: quantization_bit (4 or 8), quantization_type, double_quantization",
    "train_dataset": "dataset (a v1 dataset YAML, a data file, or a folder)",
    "eval_dataset": "eval_dataset",
    "output_dir": "output_dir",
    "micro_batch_size": "per_device_train_batch_size (the token budget unit of the dynamic strategies)",
    "global_batch_size": "gradient_accumulation_steps = global_batch_size / (processes x micro_batch_size)",
    "cutoff_len": "cutoff_len",
    "learning_rate": "learning_rate (constant, no warmup, as in v1)",
    "num_train_epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "max_grad_norm": "max_grad_norm",
    "bf16": "bf16 (v1's default: true)",
    "batching_strategy": "batching_strategy: normal | padding_free | dynamic_batching | dynamic_padding_free",
    "batching_workers": "no effect (lmf tokenizes before training)",
    "enable_activation_checkpointing": "gradient_checkpointing",
    "dist_config": "fsdp2: fsdp full_shard (reshard_after_forward); deepspeed: deepspeed config_file; "
                   "fsdpturbo, dcp_path, offload_params: refused",
    "dp_size": "must be the number of processes / cp_size", "cp_size": "1 (context parallelism is refused)",
    "cp_mode": "ulysses (only with cp_size > 1, which is refused)", "mp_replicate_size": "1",
    "mp_shard_size": "the number of processes", "dist_timeout": "ddp_timeout",
    "optim_config": "muon: use_muon (wd -> weight_decay, adamw_betas, adamw_eps); others refused",
    "lr_scheduler_config": "refused (v1 registers no scheduler plugin)",
    "seed": "seed", "full_determinism": "full_determinism",
    "resume_from_checkpoint": "resume_from_checkpoint (auto: the newest complete checkpoint)",
    "save_steps": "save_steps", "save_epochs": "1: save_strategy epoch; other values refused",
    "save_ckpt_as_hf": "no effect (lmf's checkpoints hold HF-format models)",
    "save_total_limit": "save_total_limit", "logging_steps": "logging_steps",
    "pref_loss": "pref_loss", "pref_beta": "pref_beta", "pref_ftx": "pref_ftx", "simpo_gamma": "simpo_gamma",
    "dpo_label_smoothing": "dpo_label_smoothing", "ld_alpha": "ld_alpha (LD-DPO)",
    "sample_backend": "infer_backend (hf: huggingface, vllm)", "max_new_tokens": "max_new_tokens",
    "custom_chat_template": "refused (not implemented; template: auto uses the tokenizer's own)",
}


def v1_only_keys() -> frozenset:
    """The v1 keys lmf's own schema does not have: one of them makes a config v1."""
    from lmf.config.lf_keys import LF_KEYS
    from lmf.config.parser import KEY_INDEX

    return frozenset(k for k in V1_KEYS if k not in KEY_INDEX and k not in LF_KEYS)


_PLUGIN_KEYS = {
    "lora": {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "modules_to_save",
             "adapter_name_or_path", "export_dir", "export_size", "export_hub_model_id", "infer_dtype",
             "export_legacy_format"},
    "freeze": {"freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
               "cast_trainable_params_to_fp32"},
    "fsdp2": {"reshard_after_forward", "offload_params", "pin_memory", "dcp_path", "cp_size", "cp_mode", "dp_size",
              "mp_replicate_size", "mp_shard_size", "timeout"},
    "deepspeed": {"config_file", "cp_size", "cp_mode", "dp_size", "timeout"},
    "bnb": {"quantization_bit", "compute_dtype", "double_quantization", "quantization_type"},
    "muon": {"wd", "momentum", "nesterov", "ns_steps", "adamw_betas", "adamw_eps", "lr"},
}


def is_v1_config(raw: dict) -> bool:
    """A v1 config has at least one key that only v1 has."""
    only = v1_only_keys()
    return any(key in only for key in raw)


def translate_v1(raw: dict, source: str = "config", stage: Optional[str] = None) -> dict:
    """The lmf (v0) keys of v1 config ``raw``; ``stage`` comes from the command (v1 has no stage key)."""
    from lmf.config.lf_keys import LF_KEYS
    from lmf.config.parser import KEY_INDEX

    unknown = [k for k in raw if k not in V1_KEYS]
    v0 = [k for k in unknown if k in KEY_INDEX or k in LF_KEYS]
    if v0:
        v1 = next(k for k in raw if k in v1_only_keys())
        raise ConfigError(f"{source}: mixes LLaMA-Factory v1 keys ({v1!r}) with v0 keys ({', '.join(map(repr, v0))}); "
                          "write the whole file in one schema (`lmf help config --v1` lists the v1 keys)")
    if unknown:
        raise ConfigError(f"{source}: unknown v1 config key(s) {', '.join(map(repr, unknown))}; see "
                          "`lmf help config --v1`")
    out: dict[str, Any] = {
        # v1's defaults where they differ from lmf's
        "bf16": True, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.01,
        "template": "auto", "do_train": True,
    }
    if stage:
        out["stage"] = stage
    for key in ("trust_remote_code", "eval_dataset", "output_dir", "cutoff_len", "learning_rate", "num_train_epochs",
                "max_steps", "max_grad_norm", "bf16", "seed", "save_steps", "save_total_limit", "logging_steps",
                "pref_loss", "pref_beta", "pref_ftx", "simpo_gamma", "dpo_label_smoothing", "max_new_tokens",
                "template", "full_determinism", "ld_alpha"):
        if key in raw and raw[key] is not None:
            out[key] = raw[key]
    _model(raw, out)
    _data_and_batching(raw, out)
    _peft(_plugin(raw, "peft_config"), out)
    _dist(raw, _plugin(raw, "dist_config"), out)
    _kernels(_plugin(raw, "kernel_config"), out)
    _quant(_plugin(raw, "quant_config"), out)
    _optim(_plugin(raw, "optim_config"), out)
    _refusals(raw)
    if raw.get("resume_from_checkpoint") is not None:
        value = raw["resume_from_checkpoint"]
        out["resume_from_checkpoint"] = True if value == "auto" else value
    if raw.get("save_epochs") is not None:
        if float(raw["save_epochs"]) != 1.0:
            raise ConfigError(f"{source}: config key 'save_epochs': {raw['save_epochs']} is not implemented; use "
                              "save_steps, or save_epochs: 1")
        out["save_strategy"] = "epoch"
    if raw.get("sample_backend") is not None:
        backends = {"hf": "huggingface", "vllm": "vllm"}
        if raw["sample_backend"] not in backends:
            raise ConfigError(f"config key 'sample_backend': {raw['sample_backend']!r}; choose hf or vllm")
        out["infer_backend"] = backends[raw["sample_backend"]]
    if raw.get("dist_timeout") is not None:
        out["ddp_timeout"] = raw["dist_timeout"]
    logger.info("%s: a LLaMA-Factory v1 config, run as %s", source,
                ", ".join(f"{k}={v}" for k, v in out.items() if k in ("finetuning_type", "stage", "fsdp", "deepspeed",
                                                                       "batching_strategy", "quantization_bit")))
    return out


def _plugin(raw: dict, key: str) -> Optional[dict]:
    """A plugin block (a mapping or its JSON text) with its ``name``, sub-keys checked; None when absent."""
    import json

    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"config key {key!r}: expected a mapping or JSON object, got {value!r}") from exc
    if not isinstance(value, dict) or not value.get("name"):
        raise ConfigError(f"config key {key!r}: a plugin block needs a 'name' field, got {value!r}")
    allowed = _PLUGIN_KEYS.get(str(value["name"]))
    if allowed is not None:
        extra = sorted(set(value) - allowed - {"name"})
        if extra:
            raise ConfigError(f"config key {key!r}: unknown field(s) {', '.join(extra)} for {value['name']!r}; "
                              f"known: {', '.join(sorted(allowed))}")
    return value


def _model(raw: dict, out: dict) -> None:
    if "model" in raw:
        out["model_name_or_path"] = raw["model"]
    model_class = raw.get("model_class", "llm")
    if model_class == "cls" and out.get("stage") not in (None, "rm"):
        raise ConfigError("config key 'model_class': cls is the reward-model class of `lmf rm`")
    if model_class not in ("llm", "cls"):
        raise ConfigError(f"config key 'model_class': {model_class!r} is not implemented (llm, or cls with lmf rm)")
    attn = raw.get("flash_attn")
    if attn is not None:
        mapping = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "auto"}
        if attn not in mapping:
            raise ConfigError(f"config key 'flash_attn': {attn!r}; choose eager, sdpa or flash_attention_2")
        out["flash_attn"] = mapping[attn]
        if attn == "flash_attention_2":
            logger.info("flash_attn: flash_attention_2 -> FA2 where it is usable (CUDA, flash-attn installed), sdpa "
                        "otherwise; lmf's padding-free batches do not need FA2")
    if raw.get("enable_activation_checkpointing") is not None:
        out["gradient_checkpointing"] = bool(raw["enable_activation_checkpointing"])
    init = _plugin(raw, "init_config")
    if init is not None and init["name"] == "init_on_rank0":
        out["init_on_rank0"] = True
    elif init is not None and init["name"] == "init_on_meta":
        out["init_on_meta"] = True
    elif init is not None and init["name"] != "init_on_default":
        raise ConfigError(f"config key 'init_config': {init['name']} is not implemented; use init_on_meta, "
                          "init_on_rank0 or init_on_default")


def _data_and_batching(raw: dict, out: dict) -> None:
    if raw.get("train_dataset") is not None:
        out["dataset"] = raw["train_dataset"]
        out["dataset_dir"] = "."
    if raw.get("micro_batch_size") is not None:
        out["per_device_train_batch_size"] = raw["micro_batch_size"]
    if raw.get("global_batch_size") is not None:  # resolved once the processes are known (lmf.config.world)
        out["global_batch_size"] = raw["global_batch_size"]
    if raw.get("batching_strategy") is not None:
        out["batching_strategy"] = raw["batching_strategy"]


def _peft(peft: Optional[dict], out: dict) -> None:
    if peft is None:
        out["finetuning_type"] = "full"
        return
    name = peft["name"]
    if name == "lora":
        out["finetuning_type"] = "lora"
        renames = {"r": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                   "use_rslora": "use_rslora", "use_dora": "use_dora", "adapter_name_or_path": "adapter_name_or_path",
                   "export_dir": "export_dir", "export_size": "export_size", "infer_dtype": "infer_dtype",
                   "export_legacy_format": "export_legacy_format", "export_hub_model_id": "export_hub_model_id"}
        out.update(lora_rank=8, lora_alpha=16, lora_dropout=0.05, lora_target="all")  # v1's LoraParams defaults
        for key, target in renames.items():
            if peft.get(key) is not None:
                value = peft[key]
                out[target] = ",".join(value) if isinstance(value, list) else value
        if peft.get("target_modules") is not None:
            value = peft["target_modules"]
            out["lora_target"] = ",".join(value) if isinstance(value, list) else value
        if peft.get("modules_to_save"):
            value = peft["modules_to_save"]
            out["additional_target"] = ",".join(value) if isinstance(value, list) else value
    elif name == "freeze":
        out["finetuning_type"] = "freeze"
        for key in ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"):
            if peft.get(key) is not None:
                value = peft[key]
                out[key] = ",".join(value) if isinstance(value, list) else value
        if peft.get("cast_trainable_params_to_fp32") is False:
            out["pure_bf16"] = True
    else:
        raise ConfigError(f"config key 'peft_config': {name!r} is not implemented (lora or freeze)")


def _dist(raw: dict, dist: Optional[dict], out: dict) -> None:
    block = dist or {}
    cp = raw.get("cp_size", block.get("cp_size", 1)) or 1
    if int(cp) != 1:
        raise ConfigError(f"config key 'cp_size': {cp}: context parallelism ({raw.get('cp_mode', 'ulysses')}) is not "
                          "implemented in lmf; use cp_size: 1 (long sequences: use_chunked_loss, gradient "
                          "checkpointing, padding-free batches)")
    dp_size = raw.get("dp_size", block.get("dp_size"))
    if dp_size is not None:  # checked once the processes are known (lmf.config.world)
        out["dp_size"] = dp_size
    for key in ("mp_replicate_size",):
        if int(raw.get(key, block.get(key, 1)) or 1) != 1:
            raise ConfigError(f"config key {key!r}: hybrid model meshes are not implemented here; use fsdp "
                              "hybrid_shard in a v0 config")
    if dist is None:
        return
    name = dist["name"]
    if name == "fsdp2":
        if dist.get("dcp_path"):
            raise ConfigError("config key 'dist_config.dcp_path': loading DCP checkpoints is not implemented; "
                              "give model a Hugging Face folder")
        if dist.get("offload_params"):
            raise ConfigError("config key 'dist_config.offload_params' is not implemented; use a DeepSpeed offload "
                              "config (mapped onto FSDP2's CPU offload)")
        out["fsdp"] = "full_shard"
        if dist.get("reshard_after_forward") is False:
            out["fsdp_config"] = {"reshard_after_forward": False}
    elif name == "deepspeed":
        if not dist.get("config_file"):
            raise ConfigError("config key 'dist_config': deepspeed needs config_file")
        out["deepspeed"] = dist["config_file"]
    else:
        raise ConfigError(f"config key 'dist_config': {name!r} is not implemented (fsdp2 or deepspeed; fsdpturbo's "
                          "expert parallelism needs the fsdp_turbo package and many GPUs)")
    if dist.get("timeout") is not None:
        out["ddp_timeout"] = dist["timeout"]


def _kernels(kernels: Optional[dict], out: dict) -> None:
    if kernels is None:
        return
    apply_kernel_names([n.strip() for n in str(kernels["name"]).split(",") if n.strip()], out)


def apply_kernel_names(names: list[str], out: dict, key: str = "kernel_config") -> None:
    """v1's kernel plugins (``kernel_config: {name: ...}``; 0.9.5's ``use_v1_kernels: true`` is ``auto``) -> lmf
    keys in ``out``."""
    for name in names:
        if name == "auto":
            logger.info("%s: auto applies LLaMA-Factory's NPU kernels only; nothing to apply on CUDA or CPU", key)
        elif name == "liger_kernel":
            out["enable_liger_kernel"] = True
        elif name == "flash-linear-attention":
            logger.info("kernel_config: flash-linear-attention -> lmf uses the fla kernels for linear attention "
                        "layers when the package is installed (the log says which path runs)")
        else:
            raise ConfigError(f"config key 'kernel_config': kernel {name!r} is not implemented (auto, liger_kernel, "
                              "flash-linear-attention)")


def _quant(quant: Optional[dict], out: dict) -> None:
    if quant is None:
        return
    if quant["name"] not in ("bnb", "auto"):
        raise ConfigError(f"config key 'quant_config': {quant['name']!r} is not implemented (bnb or auto)")
    bits = quant.get("quantization_bit")
    if bits is None and quant["name"] == "auto":
        return
    out["quantization_bit"] = int(bits or 4)
    for key in ("quantization_type", "double_quantization"):
        if quant.get(key) is not None:
            out[key] = quant[key]


def _optim(optim: Optional[dict], out: dict) -> None:
    if optim is None:
        return
    if optim["name"] != "muon":
        raise ConfigError(f"config key 'optim_config': {optim['name']!r} is not implemented (muon)")
    for key, fixed in (("momentum", 0.95), ("nesterov", True), ("ns_steps", 5)):
        if optim.get(key) is not None and optim[key] != fixed:
            raise ConfigError(f"config key 'optim_config.{key}': {optim[key]!r} is not implemented; lmf's Muon "
                              f"uses {fixed!r}")
    out["use_muon"] = True
    out["weight_decay"] = optim.get("wd", 0.1)
    betas = optim.get("adamw_betas", [0.9, 0.95])
    out["adam_beta1"], out["adam_beta2"] = float(betas[0]), float(betas[1])
    out["adam_epsilon"] = float(optim.get("adamw_eps", 1e-8))


def _refusals(raw: dict) -> None:
    if raw.get("lr_scheduler_config") is not None:
        raise ConfigError("config key 'lr_scheduler_config' is not implemented (LLaMA-Factory v1 registers no "
                          "scheduler plugin; the learning rate is constant)")
    if raw.get("custom_chat_template") is not None:
        raise ConfigError("config key 'custom_chat_template' is not implemented; lmf renders with the tokenizer's "
                          "own chat template (template: auto) or a named template")


def describe_v1_keys() -> str:
    """``lmf help config --v1``: every v1 key and what it becomes."""
    width = max(len(k) for k in V1_KEYS)
    lines = ["LLaMA-Factory v1 config keys (a config with one of them is read as v1):", ""]
    lines += [f"  {key.ljust(width)}  -> {meaning}" for key, meaning in V1_KEYS.items()]
    return "\n".join(lines)
