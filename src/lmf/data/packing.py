"""Packing: put several tokenized samples into one sequence of at most ``cutoff_len`` tokens.

Samples are assigned to bins largest-first, each time taking the largest remaining sample that
still fits (first-fit decreasing). Every packed row gets ``position_ids`` that restart at 0 at each
sample boundary, so a backend with variable-length attention (flash-attn varlen, or a block-diagonal
mask built from the position ids) can keep attention per sample. Labels keep each sample's mask, and
the first label of every sample is masked (as transformers' ``DataCollatorWithFlattening`` does): the
loss shifts labels by one within the row, so the last position of sample k would otherwise be trained
to predict the first token of sample k+1. Packed and unpacked data thus train on exactly the same
(position, target) pairs.
"""

from __future__ import annotations

import bisect
from typing import Any

from lmf.extras.constants import IGNORE_INDEX


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins whose total length is <= ``capacity`` (first-fit decreasing)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    bins: list[list[int]] = []
    while order:
        # the longest remaining sample opens a bin; fill it with the longest ones that still fit
        current = [order.pop()]
        room = capacity - sorted_lengths.pop()
        while order and room > 0:
            k = bisect.bisect_right(sorted_lengths, room) - 1
            if k < 0:
                break
            room -= sorted_lengths.pop(k)
            current.append(order.pop(k))
        bins.append(current)
    return bins


def padding_waste(lengths: list[int], capacity: int) -> float:
    """Fraction of a ``len(lengths) x capacity`` block that is padding."""
    if not lengths:
        return 0.0
    return 1.0 - sum(lengths) / (len(lengths) * capacity)


def pack_dataset(dataset, capacity: int, cache_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Packed copy of a tokenized (input_ids, attention_mask, labels) dataset and packing statistics."""
    import datasets
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()
    bins = plan_bins(lengths, capacity)
    dataset = dataset.select_columns(["input_ids", "labels"])

    def gen():
        for members in bins:
            input_ids: list[int] = []
            labels: list[int] = []
            position_ids: list[int] = []
            for i in members:
                row = dataset[i]
                input_ids += row["input_ids"]
                labels.append(IGNORE_INDEX)  # never a target: it would be predicted from the previous sample
                labels += row["labels"][1:]
                position_ids += list(range(len(row["input_ids"])))
            yield {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
                   "position_ids": position_ids}

    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "attention_mask": datasets.List(datasets.Value("int8")),
        "labels": datasets.List(datasets.Value("int32")),
        "position_ids": datasets.List(datasets.Value("int32")),
    })
    packed = datasets.Dataset.from_generator(gen, features=features, cache_dir=cache_dir)
    packed_lengths = [sum(lengths[i] for i in b) for b in bins]
    stats = {
        "packed_sequences": len(bins),
        "samples_per_sequence": round(len(lengths) / max(len(bins), 1), 2),
        "padding_waste_unpacked": round(padding_waste(lengths, capacity), 4),
        "padding_waste_packed": round(padding_waste(packed_lengths, capacity), 4),
    }
    return packed, stats
