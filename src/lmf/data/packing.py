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

from lmf.data.layout import features as layout_features
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


#: Tokens per written batch of packed rows: bounds the memory of one batch and keeps Arrow's 32-bit list offsets valid.
PACK_BATCH_TOKENS = 1 << 26


def pack_dataset(dataset, capacity: int, cache_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Packed copy of a tokenized (input_ids, attention_mask, labels) dataset and packing statistics.

    Built by Arrow and numpy on whole columns, a batch of bins at a time: the batch's rows taken in bin order,
    their values concatenated, one list per bin (no Python list per token). Written to ``cache_dir``
    (memory-mapped from there), or kept in memory without one.
    """
    import os
    import uuid

    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:].select(["input_ids", "labels"])
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    bins = plan_bins(lengths.tolist(), capacity)
    features = layout_features("packed")
    schema = features.arrow_schema

    def packed_batch(group: list[list[int]]) -> pa.RecordBatch:
        order = np.fromiter((i for members in group for i in members), dtype=np.int64)
        sizes = lengths[order]
        sample_offsets = np.concatenate(([0], np.cumsum(sizes)))
        starts = sample_offsets[:-1]
        offsets = pa.array(sample_offsets[np.cumsum([0] + [len(members) for members in group])].astype(np.int32))
        rows = table.take(pa.array(order))
        input_ids = pc.list_flatten(rows["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int32)
        labels = pc.list_flatten(rows["labels"]).to_numpy(zero_copy_only=False).astype(np.int32)
        labels[starts[sizes > 0]] = IGNORE_INDEX  # never a target: it would be predicted from the previous sample
        positions = np.arange(len(input_ids), dtype=np.int64) - np.repeat(starts, sizes)
        columns = (input_ids, np.ones(len(input_ids), dtype=np.int8), labels, positions.astype(np.int32))
        return pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(values, type=field.type.value_type))
             for values, field in zip(columns, schema)], schema=schema)

    def groups():  # consecutive bins, PACK_BATCH_TOKENS tokens at most (one bin at least)
        group, tokens = [], 0
        for members, size in zip(bins, bin_lengths):
            if group and tokens + size > PACK_BATCH_TOKENS:
                yield group
                group, tokens = [], 0
            group.append(members)
            tokens += size
        if group:
            yield group

    bin_lengths = [int(lengths[members].sum()) for members in bins]
    batches = map(packed_batch, groups())
    if cache_dir is None:
        packed = datasets.Dataset(pa.Table.from_batches(list(batches), schema=schema))
    else:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"packed-{uuid.uuid4().hex}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        packed = datasets.Dataset.from_file(path)
    stats = {
        "packed_sequences": len(bins),
        "samples_per_sequence": round(len(lengths) / max(len(bins), 1), 2),
        "padding_waste_unpacked": round(padding_waste(lengths.tolist(), capacity), 4),
        "padding_waste_packed": round(padding_waste(bin_lengths, capacity), 4),
    }
    return packed, stats
