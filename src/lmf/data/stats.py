"""Token statistics of a tokenized dataset (logged and kept in the preprocessing cache's stats.json)."""

from __future__ import annotations

from typing import Any, Iterator

from lmf.data.layout import layout_of
from lmf.extras.constants import IGNORE_INDEX

#: Rows per Arrow batch read by the statistics, packing and length passes: their memory is bounded by one batch,
#: not the dataset (a whole-column pass over 142M tokens took 1.2 GB).
ROWS_PER_CHUNK = 8192


def arrow_chunks(ds, columns: list[str], rows: int = ROWS_PER_CHUNK) -> Iterator:
    """``pyarrow.Table`` chunks of ``columns`` of a ``datasets.Dataset`` (its index mapping applied), ``rows`` at a
    time: memory-mapped data is read a chunk at a time instead of materialised."""
    view = ds.select_columns(columns).with_format("arrow")
    for start in range(0, len(ds), rows):
        yield view[start:start + rows]


def python_ints(values, chunk: int = 1 << 16) -> Iterator[int]:
    """The numbers of a numpy array as Python ints, converted a chunk at a time (not one list of them all)."""
    for start in range(0, len(values), chunk):
        yield from values[start:start + chunk].tolist()


def list_lengths(ds, column: str = "input_ids"):
    """numpy int32 array of the list lengths of ``column`` (4 bytes per row; read chunk by chunk)."""
    import numpy as np
    import pyarrow.compute as pc

    parts = [pc.list_value_length(chunk[column]).to_numpy(zero_copy_only=False).astype(np.int32)
             for chunk in arrow_chunks(ds, [column])]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def token_stats(ds, stage: str) -> dict[str, Any]:
    """Counts and length statistics of a tokenized dataset (Arrow compute on bounded chunks, not Python loops)."""
    import pyarrow.compute as pc

    layout = layout_of(stage)
    prefix = "chosen_" if layout == "pairwise" else ""
    columns = [f"{prefix}input_ids", f"{prefix}labels"]
    columns += ["rejected_input_ids"] if layout == "pairwise" else []
    columns += ["kto_tags"] if layout == "feedback" else []
    columns += ["_truncated"] if "_truncated" in ds.column_names else []
    n = len(ds)
    tokens = label_tokens = rejected = desirable = truncated = 0
    shortest, longest = None, 0
    for chunk in arrow_chunks(ds, columns):
        lengths = pc.list_value_length(chunk[columns[0]])
        tokens += int(pc.sum(lengths).as_py() or 0)
        label_tokens += int(pc.sum(pc.not_equal(pc.list_flatten(chunk[columns[1]]), IGNORE_INDEX)).as_py() or 0)
        low, high = pc.min_max(lengths).values()
        shortest = low.as_py() if shortest is None else min(shortest, low.as_py())
        longest = max(longest, high.as_py() or 0)
        if layout == "pairwise":
            rejected += int(pc.sum(pc.list_value_length(chunk["rejected_input_ids"])).as_py() or 0)
        if layout == "feedback":
            desirable += int(pc.sum(chunk["kto_tags"]).as_py() or 0)
        if "_truncated" in columns:
            truncated += int(pc.sum(chunk["_truncated"]).as_py() or 0)
    stats = {
        "samples": n,
        "tokens": tokens,
        "label_tokens": label_tokens,
        "min_length": int(shortest or 0),
        "max_length": int(longest),
        "mean_length": round(tokens / n, 1) if n else 0.0,
    }
    if layout == "pairwise":
        stats["rejected_tokens"] = rejected
        stats["rejected_mean_length"] = round(rejected / n, 1) if n else 0.0
    if layout == "feedback":
        stats["desirable"] = desirable
        stats["undesirable"] = n - desirable
    if "_truncated" in columns:
        stats["truncated"] = truncated
    return stats
