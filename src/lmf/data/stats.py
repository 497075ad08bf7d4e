"""Token statistics of a tokenized dataset (logged and kept in the preprocessing cache's stats.json)."""

from __future__ import annotations

from typing import Any

from lmf.data.layout import layout_of
from lmf.extras.constants import IGNORE_INDEX


def token_stats(ds, stage: str) -> dict[str, Any]:
    """Counts and length statistics of a tokenized dataset (computed with Arrow, not Python loops)."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    layout = layout_of(stage)
    prefix = "chosen_" if layout == "pairwise" else ""
    lengths = pc.list_value_length(table[f"{prefix}input_ids"])
    labels = pc.list_flatten(table[f"{prefix}labels"])
    n = len(ds)
    stats = {
        "samples": n,
        "tokens": int(pc.sum(lengths).as_py() or 0),
        "label_tokens": int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0),
        "min_length": int(pc.min(lengths).as_py() or 0) if n else 0,
        "max_length": int(pc.max(lengths).as_py() or 0) if n else 0,
        "mean_length": round(float(pc.mean(lengths).as_py() or 0), 1) if n else 0.0,
    }
    if layout == "pairwise":
        rej = pc.list_value_length(table["rejected_input_ids"])
        stats["rejected_tokens"] = int(pc.sum(rej).as_py() or 0)
        stats["rejected_mean_length"] = round(float(pc.mean(rej).as_py() or 0), 1) if n else 0.0
    if layout == "feedback":
        stats["desirable"] = int(pc.sum(table["kto_tags"]).as_py() or 0)
        stats["undesirable"] = n - stats["desirable"]
    if "_truncated" in table.column_names:
        stats["truncated"] = int(pc.sum(table["_truncated"]).as_py() or 0)
    return stats
