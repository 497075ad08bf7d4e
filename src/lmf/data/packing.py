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


def plan_bin_members(lengths, capacity: int):
    """First-fit decreasing as flat arrays: (sample indices in bin order, samples per bin), numpy integer arrays.

    The longest remaining sample opens a bin, which is filled with the longest remaining ones that still fit (among
    equal lengths, the highest index first). Samples are kept in one bucket per distinct length, so each choice is a
    binary search over the distinct lengths: O(n log L) time and ~20 bytes per sample at the peak (the stable sort's
    int64 order, the int32 plan), no Python object per sample.
    """
    import numpy as np

    from array import array

    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":  # a Python list (empty: float)
        lengths = lengths.astype(np.int64)
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    starts = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1)).astype(np.int64) \
        if len(ordered) else np.zeros(0, dtype=np.int64)
    alive = ordered[starts].tolist()  # distinct lengths with samples left, ascending
    del ordered
    first = dict(zip(alive, starts.tolist()))
    end = dict(zip(alive, starts[1:].tolist() + [len(lengths)]))
    members = np.empty(len(lengths), dtype=np.int64 if len(lengths) >= 2**31 else np.int32)
    sizes = array("q")  # samples per bin: 8 bytes a bin, not a Python int
    taken = 0

    def take(position: int) -> int:  # the next sample of the length at ``alive[position]``
        nonlocal taken
        value = alive[position]
        end[value] -= 1
        members[taken] = order[end[value]]
        taken += 1
        if end[value] == first[value]:
            del alive[position]
        return value

    while alive:
        opened = taken
        room = capacity - take(len(alive) - 1)
        while alive and room > 0:
            k = bisect.bisect_right(alive, room) - 1
            if k < 0:
                break
            room -= take(k)
        sizes.append(taken - opened)
    return members, np.frombuffer(sizes, dtype=np.int64) if len(sizes) else np.zeros(0, dtype=np.int64)


def plan_bins(lengths, capacity: int) -> list[list[int]]:
    """Group sample indices into bins whose total length is <= ``capacity`` (first-fit decreasing,
    :func:`plan_bin_members` as one list per bin)."""
    import numpy as np

    members, sizes = plan_bin_members(lengths, capacity)
    return [part.tolist() for part in np.split(members, np.cumsum(sizes)[:-1])] if len(sizes) else []


def padding_waste(lengths, capacity: int) -> float:
    """Fraction of a ``len(lengths) x capacity`` block that is padding (``lengths``: a list or a numpy array)."""
    import numpy as np

    if not len(lengths):
        return 0.0
    return 1.0 - int(np.sum(lengths, dtype=np.int64)) / (len(lengths) * capacity)


#: Tokens per written batch of packed rows: bounds the memory of one batch (~70 bytes a token while it is built) and
#: keeps Arrow's 32-bit list offsets valid.
PACK_BATCH_TOKENS = 1 << 20


def pack_dataset(dataset, capacity: int, cache_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Packed copy of a tokenized (input_ids, attention_mask, labels) dataset and packing statistics.

    Built by Arrow and numpy a batch of bins at a time (at most :data:`PACK_BATCH_TOKENS` tokens): the batch's rows
    gathered in bin order, their values concatenated, one list per bin (no Python list per token). Memory is the
    lengths and the bin plan (~26 bytes a sample at the peak, bench/RESULTS-data-scale.md) plus one batch, whatever
    the number of tokens. Written to
    ``cache_dir`` (memory-mapped from there), or kept in memory without one.
    """
    import os
    import uuid

    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from lmf.data.stats import list_lengths, python_ints

    lengths = list_lengths(dataset)
    members, sizes = plan_bin_members(lengths, capacity)
    bin_ends = np.cumsum(sizes)
    bin_lengths = np.add.reduceat(lengths[members], bin_ends - sizes) if len(sizes) else np.zeros(0, np.int64)
    view = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")
    features = layout_features("packed")
    schema = features.arrow_schema

    def packed_batch(first_bin: int, last_bin: int) -> pa.RecordBatch:
        lo = int(bin_ends[first_bin - 1]) if first_bin else 0
        order = members[lo:int(bin_ends[last_bin - 1])]
        sample_sizes = lengths[order]
        sample_offsets = np.concatenate(([0], np.cumsum(sample_sizes)))
        starts = sample_offsets[:-1]
        offsets = pa.array(sample_offsets[np.concatenate(([0], bin_ends[first_bin:last_bin] - lo))].astype(np.int32))
        rows = view[order.tolist()]
        input_ids = pc.list_flatten(rows["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int32)
        labels = pc.list_flatten(rows["labels"]).to_numpy(zero_copy_only=False).astype(np.int32)
        labels[starts[sample_sizes > 0]] = IGNORE_INDEX  # never a target: it would be predicted from the previous sample
        positions = np.arange(len(input_ids), dtype=np.int64) - np.repeat(starts, sample_sizes)
        columns = (input_ids, np.ones(len(input_ids), dtype=np.int8), labels, positions.astype(np.int32))
        return pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(values, type=field.type.value_type))
             for values, field in zip(columns, schema)], schema=schema)

    def batches():  # consecutive bins, PACK_BATCH_TOKENS tokens at most (one bin at least)
        first, tokens = 0, 0
        for b, size in enumerate(python_ints(bin_lengths)):
            if b > first and tokens + size > PACK_BATCH_TOKENS:
                yield packed_batch(first, b)
                first, tokens = b, 0
            tokens += size
        if len(bin_lengths):
            yield packed_batch(first, len(bin_lengths))

    if cache_dir is None:
        packed = datasets.Dataset(pa.Table.from_batches(list(batches()), schema=schema))
    else:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"packed-{uuid.uuid4().hex}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches():
                writer.write_batch(batch)
        packed = datasets.Dataset.from_file(path)
    stats = {
        "packed_sequences": len(sizes),
        "samples_per_sequence": round(len(lengths) / max(len(sizes), 1), 2),
        "padding_waste_unpacked": round(padding_waste(lengths, capacity), 4),
        "padding_waste_packed": round(padding_waste(bin_lengths, capacity), 4),
    }
    return packed, stats
