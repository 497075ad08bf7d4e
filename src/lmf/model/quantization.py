"""QLoRA's base-model quantization: ``quantization_bit`` as a bitsandbytes config, the k-bit preparation for
training, and the checks on checkpoints that arrive already quantized."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.args import LmfConfig, ModelArguments

logger = get_logger(__name__)

QLORA_INSTALL = "pip install 'lmf[qlora]'"


def quantization_config(cfg: "LmfConfig", compute_dtype):
    """``quantization_bit`` (4 or 8) as transformers' ``BitsAndBytesConfig``, or None. The 4-bit compute and
    storage dtypes are the weights' dtype (bf16/fp16 on GPU, fp32 on CPU)."""
    m = cfg.model
    if m.quantization_bit is None:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise NotAvailableError(f"quantization_bit: {m.quantization_bit} needs bitsandbytes: {QLORA_INSTALL}")
    from transformers import BitsAndBytesConfig

    if m.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=m.quantization_type,
                              bnb_4bit_use_double_quant=m.double_quantization, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype)


def _saved_bits(quant: dict) -> int | None:
    if quant.get("load_in_4bit") or quant.get("_load_in_4bit"):
        return 4
    if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
        return 8
    return None


def check_pre_quantized(model_args: "ModelArguments", model_config: dict) -> None:
    """A checkpoint saved already quantized (its config.json has ``quantization_config``). A bitsandbytes one
    trains as QLoRA when ``quantization_bit`` names its bits (so every QLoRA code path knows the base is
    quantized); other methods (GPTQ, AWQ, AQLM, ...) are refused: lmf trains them on a full-precision base
    quantized at load time."""
    quant = model_config.get("quantization_config")
    if not quant:
        return
    method = str(quant.get("quant_method", "unknown"))
    path = model_args.model_name_or_path
    if method != "bitsandbytes":
        raise NotAvailableError(
            f"model_name_or_path={path!r} is a pre-quantized {method} checkpoint; lmf does not train on {method} "
            "weights (not implemented). Use the full-precision model with quantization_bit: 4 (QLoRA with "
            "bitsandbytes, quantized at load time)")
    bits = _saved_bits(quant)
    if model_args.quantization_bit != bits:
        raise ConfigError(
            f"model_name_or_path={path!r} is saved quantized by bitsandbytes in {bits}-bit; set quantization_bit: "
            f"{bits} (now {model_args.quantization_bit}) so it trains and serves as QLoRA on its saved weights")
    logger.info("model is saved quantized (bitsandbytes %s-bit): its own quantization settings are used", bits)


def prepare_quantized_for_training(model) -> None:
    """The k-bit preparation of QLoRA, once: peft's ``prepare_model_for_kbit_training`` (every weight frozen, the
    non-quantized ones, norms, embeddings and head, in fp32; inputs that require grads for checkpointing);
    lmf's own gradient checkpointing is applied after it."""
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    _keep_trainable_weight_layout(model)
    logger.info("quantized base (QLoRA / QOFT): non-quantized weights in float32, the adapter trains on top")


def _keep_trainable_weight_layout(model) -> None:
    """bitsandbytes repacks a ``Linear4bit`` weight for its AVX512-BF16 CPU inference kernel on the first forward
    in eval mode without grads (a DPO/KTO reference pass, an evaluation); that kernel has no backward, so every
    training step after it would drop the gradient through the base weights without an error. Training keeps the
    trainable layout: the repacking is switched off on every 4-bit layer."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
