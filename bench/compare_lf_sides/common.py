"""Helpers shared by the two benchmark sides (stdlib, numpy and pyarrow only: both venvs have them).

Each side script (``lf_side.py`` runs in LLaMA-Factory's venv, ``lmf_side.py`` in lmf's) is started
as a fresh process by ``bench/compare_lf.py`` with ``SPEC.json RESULT.json``; it never imports the
other framework.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time

IGNORE_INDEX = -100


def read_spec() -> tuple[dict, str]:
    """(spec dict, result path) from ``argv = [script, SPEC.json, RESULT.json]``."""
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} SPEC.json RESULT.json")
    with open(sys.argv[1], encoding="utf-8") as fh:
        return json.load(fh), sys.argv[2]


def write_result(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (and any waited-for children), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0  # Linux reports KiB


def token_stats(dataset, pad_token_id: int, with_digest: bool = True) -> dict:
    """Counts over a tokenized dataset: ``input_ids``/``labels`` list columns (sft, pt), or their ``chosen_`` and
    ``rejected_`` pairs (dpo, rm; rows count the chosen rows, then the rejected ones).

    ``real_tokens`` counts tokens that are not ``pad_token_id`` (packed rows carry padding; the
    data itself never contains the pad token), ``label_tokens`` those trained on. ``digest`` is a
    sha256 over every row's input_ids, labels and length, in row order: equal digests on both
    sides mean token-for-token identical datasets.
    """
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    prefixes = ("",) if "input_ids" in table.column_names else ("chosen_", "rejected_")  # pairwise: both sides

    def column(name, fn):
        return np.concatenate([fn(table[p + name]).to_numpy(zero_copy_only=False).astype(np.int64) for p in prefixes])

    ids = column("input_ids", pc.list_flatten)
    labels = column("labels", pc.list_flatten) if prefixes[0] + "labels" in table.column_names else ids  # pt: all
    lengths = column("input_ids", pc.list_value_length)
    stats = {
        "rows": int(len(lengths)),
        "tokens": int(ids.size),
        "real_tokens": int((ids != pad_token_id).sum()),
        "label_tokens": int((labels != IGNORE_INDEX).sum()),
        "max_length": int(lengths.max()) if lengths.size else 0,
    }
    if with_digest:
        h = hashlib.sha256()
        for arr in (lengths, ids, labels):
            h.update(arr.tobytes())
        stats["digest"] = h.hexdigest()[:16]
    return stats


class Stopwatch:
    """``with Stopwatch() as sw: ...``; then ``sw.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def cuda_peak_mib() -> float | None:
    """Peak CUDA memory allocated by torch in this process, MiB (None without CUDA)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20
