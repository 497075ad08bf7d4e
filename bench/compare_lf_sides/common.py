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


def _cuda():
    """torch, if it sees a CUDA device (else None)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def cuda_peak_mib() -> float | None:
    """Peak CUDA memory allocated by torch in this process, MiB (None without CUDA)."""
    torch = _cuda()
    return torch.cuda.max_memory_allocated() / 2**20 if torch else None


def cuda_reserved_mib() -> float | None:
    """Peak CUDA memory reserved by torch's caching allocator (allocated + cached + fragmentation), MiB."""
    torch = _cuda()
    return torch.cuda.max_memory_reserved() / 2**20 if torch else None


def sync() -> float:
    """``time.perf_counter()`` after the GPU's queued work is done (a step's end, on both sides)."""
    torch = _cuda()
    if torch:
        torch.cuda.synchronize()
    return time.perf_counter()


def probe(train, spec: dict, result_path: str, side: str) -> dict:
    """The longest-context probe: ``train(config)`` at each of ``spec["lengths"]`` (ascending) in this one process,
    under a CUDA memory cap of ``spec["budget_gib"]`` (``torch.cuda.set_per_process_memory_fraction``), until a
    length fails (out of memory, or any error). The result file is rewritten after every length, so a run killed
    at its time cap still tells what fitted."""
    import gc

    torch = _cuda()
    budget = spec.get("budget_gib")
    if torch and budget:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total))
    out = {"side": side, "budget_gib": budget, "lengths": {}, "capped_by_cuda": bool(torch and budget)}
    for length in spec["lengths"]:
        cfg = dict(spec["config"], cutoff_len=length, dataset_dir=spec["data_dirs"][str(length)],
                   output_dir=f"{spec['config']['output_dir']}-{length}")
        if torch:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            r = train(cfg)
        except Exception as exc:  # noqa: BLE001  (out of memory, or anything else: the probe stops there)
            out["lengths"][str(length)] = {"fits": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                           "seconds": time.perf_counter() - t0}
            write_result(result_path, out)
            break
        out["lengths"][str(length)] = {
            "fits": True, "seconds": time.perf_counter() - t0, "train_seconds": r.get("train_seconds"),
            "global_step": r.get("global_step"), "real_tokens": (r.get("data") or {}).get("real_tokens"),
            "first_loss": r.get("first_loss"), "cuda_peak_mib": cuda_peak_mib(), "cuda_reserved_mib": cuda_reserved_mib(),
            "peak_rss_mib": peak_rss_mib()}
        write_result(result_path, out)
        r = None
        gc.collect()
        if torch:
            torch.cuda.empty_cache()
    return out
