"""Mixture-of-experts facts read from a model config."""

from __future__ import annotations


def experts_of(config) -> tuple[int, int]:
    """(number of routed experts, experts per token) of a MoE config (the names differ by family)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num = next((getattr(text, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                if getattr(text, k, None)), 0)
    return int(num), int(getattr(text, "num_experts_per_tok", 1) or 1)
