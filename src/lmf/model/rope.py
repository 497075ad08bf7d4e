"""RoPE scaling (``rope_scaling: linear | dynamic | yarn | llama3``): train or serve past a model's native context.

LLaMA-Factory's rule, kept so that its YAMLs give the same model: the native length is the config's
``original_max_position_embeddings`` when its RoPE is already scaled, else ``max_position_embeddings``; the target
length is ``model_max_length`` (training: ``cutoff_len``); the factor is ``ceil(target / native)`` (inference with no
``model_max_length``: 2.0); ``max_position_embeddings`` becomes ``native * factor``; yarn and dynamic record the
native length, llama3 also its frequency factors 1.0 and 4.0. A target within the native length needs no scaling:
the model is left as it is and the log says so.

Deliberate differences: the new parameters replace the scaling keys of ``rope_parameters`` but keep the rest
(``rope_theta``, ``partial_rotary_factor``, ``mrope_section``): setting a bare ``rope_scaling`` dict, as LLaMA-Factory
does, drops ``rope_theta`` under transformers 5. A model without RoPE parameters, or with one set per layer type, is
refused naming the key instead of a warning and an unscaled model.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from lmf.extras.errors import ConfigError

logger = logging.getLogger(__name__)

ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
#: keys of a previous scaling, replaced by the new one
_SCALING_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                 "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "short_factor", "long_factor",
                 "truncate", "type")


def scaled_rope_parameters(rope: dict, kind: str, native: int, factor: float) -> dict:
    """``rope`` (a model's ``rope_parameters``) with the scaling ``kind`` by ``factor`` from ``native`` positions."""
    out = {k: v for k, v in rope.items() if k not in _SCALING_KEYS}
    out.update(rope_type=kind, factor=factor)
    if kind in ("dynamic", "yarn", "llama3"):
        out["original_max_position_embeddings"] = native
    if kind == "llama3":
        out.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return out


def native_length(text_config: Any) -> Optional[int]:
    """The length the model was pre-trained on (before any RoPE scaling its config already has)."""
    rope = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("original_max_position_embeddings"):
        return int(rope["original_max_position_embeddings"])
    native = getattr(text_config, "max_position_embeddings", None)
    return int(native) if native else None


def configure_rope(config: Any, kind: Optional[str], target_length: Optional[int], model_path: str) -> bool:
    """Scale the RoPE of ``config`` (a transformers config, changed in place) for ``target_length`` tokens
    (None: inference without ``model_max_length``, factor 2). True when the config changed."""
    if not kind:
        return False
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"config key 'rope_scaling': {kind!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None)
    where = f"the model at model_name_or_path={model_path!r}"
    if not isinstance(rope, dict) or not rope:
        raise ConfigError(f"config key 'rope_scaling': {where} has no RoPE parameters in its config "
                          f"({type(text).__name__}): remove rope_scaling")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"config key 'rope_scaling': {where} sets RoPE per layer type ({', '.join(rope)}); "
                          "scaling such a model is not implemented in lmf: remove rope_scaling")
    native = native_length(text)
    if native is None:
        raise ConfigError(f"config key 'rope_scaling': {where} has no max_position_embeddings to scale from")
    if target_length is not None:
        if target_length <= native:
            logger.info("rope_scaling=%s: %d tokens fit the model's native %d positions, no scaling applied",
                        kind, target_length, native)
            return False
        if kind == "dynamic":
            logger.warning("rope_scaling=dynamic: dynamic NTK scaling may not work well with fine-tuning "
                           "(transformers PR #24653)")
        factor = float(math.ceil(target_length / native))
    else:
        factor = 2.0
    text.rope_parameters = scaled_rope_parameters(rope, kind, native, factor)
    text.max_position_embeddings = int(native * factor)
    if hasattr(text, "validate_rope"):
        text.validate_rope()
    logger.info("rope_scaling=%s: factor %g, max positions %d -> %d", kind, factor, native,
                text.max_position_embeddings)
    return True
