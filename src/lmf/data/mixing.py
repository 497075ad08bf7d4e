"""Mixing several datasets into one: concatenated, or interleaved with probabilities (LLaMA-Factory's
``mix_strategy`` / ``interleave_probs``, the same records in the same order)."""

from __future__ import annotations

from typing import Optional

from lmf.config.parser import split_list
from lmf.extras.errors import ConfigError


#: mix_strategy -> the ``stopping_strategy`` of ``datasets.interleave_datasets`` (as LLaMA-Factory maps them).
INTERLEAVE_STRATEGIES = {
    "interleave_under": "first_exhausted",
    "interleave_over": "all_exhausted",
    "interleave_once": "all_exhausted_without_replacement",
}


def merge_datasets(parts: list, data_args, seed: int):
    """One dataset from several: concatenated (``mix_strategy: concat``) or interleaved with
    ``interleave_probs`` (LLaMA-Factory's ``merge_dataset``: the same records in the same order)."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    if data_args.mix_strategy == "concat":
        return datasets.concatenate_datasets(parts)
    probs = parse_interleave_probs(data_args.interleave_probs)
    try:
        return datasets.interleave_datasets(parts, probabilities=probs, seed=seed,
                                            stopping_strategy=INTERLEAVE_STRATEGIES[data_args.mix_strategy])
    except ValueError as exc:
        raise ConfigError(f"config keys 'mix_strategy' / 'interleave_probs': {exc}") from exc


def parse_interleave_probs(value) -> Optional[list[float]]:
    """``"0.3,0.7"`` -> [0.3, 0.7]; None stays None (uniform)."""
    if value is None:
        return None
    try:
        probs = [float(p) for p in split_list(value)]
    except ValueError:
        raise ConfigError(f"config key 'interleave_probs': {value!r} is not a comma-separated list of numbers") from None
    if any(p < 0 for p in probs) or not probs:
        raise ConfigError(f"config key 'interleave_probs': {value!r} must hold non-negative numbers")
    return probs
