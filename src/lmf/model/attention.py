"""Which attention implementation a model trains with: the ``flash_attn`` key against what the model supports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    import torch

logger = get_logger(__name__)


def resolve_attn_implementation(flash_attn: str, device: "torch.device", dtype: "torch.dtype",
                                model_class=None, model_config: Optional[dict] = None) -> str:
    """flash_attn key -> transformers attn_implementation: sdpa by default, flash_attention_2 when installed on a
    GPU, eager where the model (``model_class``) has no sdpa path (GPT-OSS) or its attention soft-caps the logits
    (Gemma-2's ``attn_logit_softcapping`` in ``model_config``, which sdpa cannot apply: transformers < 5.24 offers
    sdpa for Gemma-2 and silently drops the cap, so the class flag alone is not enough; LLaMA-Factory also
    switches Gemma-2 to eager); ``sdpa`` asked for such a model is an error naming the key."""
    import importlib.util

    import torch

    softcapped = bool((model_config or {}).get("attn_logit_softcapping"))
    supports_sdpa = (model_class is None or getattr(model_class, "_supports_sdpa", True)) and not softcapped
    supports_fa2 = model_class is None or getattr(model_class, "_supports_flash_attn", True)
    fa2_usable = (
        importlib.util.find_spec("flash_attn") is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and supports_fa2
    )
    if flash_attn == "fa2":
        if not fa2_usable:
            raise NotAvailableError(
                "flash_attn: fa2 needs the flash-attn package, a CUDA GPU, bf16/fp16 weights and a model that "
                "supports it; use flash_attn: sdpa (or auto)"
            )
        return "flash_attention_2"
    if flash_attn in ("disabled", "eager"):
        return "eager"
    if flash_attn == "sdpa" and not supports_sdpa:
        raise ConfigError(f"config key 'flash_attn': {_model_name(model_class, model_config)} has no exact sdpa "
                          "attention; use flash_attn: auto (eager here) or eager")
    if flash_attn == "auto":
        if fa2_usable:
            return "flash_attention_2"
        if not supports_sdpa:
            logger.info("flash_attn: auto: %s has no exact sdpa attention; using eager",
                        _model_name(model_class, model_config))
            return "eager"
    return "sdpa"


def _model_name(model_class, model_config: Optional[dict]) -> str:
    return model_class.__name__ if model_class is not None else str((model_config or {}).get("model_type", "the model"))
