"""Preprocessing throughput: samples/s to read, convert, tokenize and cache N Alpaca records.

The records are LLaMA-Factory's ``examples/data/alpaca_en_demo.json`` (1,000 records) replicated to
``--records`` (default 50,000) with a counter appended to each instruction so no two are equal. The
tokenizer is the locally trained tiny BPE tokenizer (``lmf.testing.tiny.build_tokenizer``); template
``qwen``, ``cutoff_len`` 1024. For each worker count it runs ``get_dataset`` with an empty cache
(full build: conversion, parallel tokenization, Arrow save) and then again (cache hit), and prints
samples/s for both, plus samples per CPU-second (this process + its workers), which does not depend on
how busy the machine is. Optionally also with packing.

    OMP_NUM_THREADS=1 python bench/bench_preprocess.py                # workers 1 and 2
    python bench/bench_preprocess.py --records 50000 --workers 1,2,4 --packing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(folder: str, n: int) -> None:
    with open(os.path.join(REPO, "examples", "data", "alpaca_en_demo.json"), encoding="utf-8") as fh:
        base = json.load(fh)
    with open(os.path.join(folder, "alpaca_big.jsonl"), "w", encoding="utf-8") as fh:
        for i in range(n):
            rec = dict(base[i % len(base)])
            rec["instruction"] = f"{rec['instruction']} ({i})"
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump({"alpaca_big": {"file_name": "alpaca_big.jsonl"}}, fh)


def run_once(data_dir: str, cache_dir: str, workers: int, packing: bool, tokenizer, template):
    from lmf.config.parser import build_config
    from lmf.data.loader import get_dataset

    cfg = build_config(dict(model_name_or_path="unused", dataset_dir=data_dir, dataset="alpaca_big", template="qwen",
                            cutoff_len=1024, preprocessing_num_workers=workers, preprocessing_cache_dir=cache_dir,
                            packing=packing))
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    module = get_dataset(cfg, tokenizer, template, "sft")
    return time.perf_counter() - start, _cpu_seconds() - cpu0, module.stats


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenization workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--packing", action="store_true", help="also measure with packing on")
    args = parser.parse_args()

    from lmf.data.template import get_template
    from lmf.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    template = get_template("qwen", tokenizer)
    tmp = tempfile.mkdtemp(prefix="lmf-bench-preprocess-")
    try:
        make_data(tmp, args.records)
        print(f"{args.records} Alpaca records, tiny BPE tokenizer (vocab {len(tokenizer)}), template qwen, "
              f"cutoff_len 1024, {os.cpu_count()} CPUs")
        print(f"{'workers':>7} {'packing':>7} {'build s':>8} {'build samples/s':>16} {'CPU s':>7} "
              f"{'samples/CPU-s':>14} {'cached s':>9} {'cached samples/s':>17} {'tokens':>11}")
        for packing in ([False, True] if args.packing else [False]):
            for workers in [int(w) for w in args.workers.split(",")]:
                cache_dir = os.path.join(tmp, f"cache-{workers}-{packing}")
                build_s, build_cpu, stats = run_once(tmp, cache_dir, workers, packing, tokenizer, template)
                assert stats["cache"] == "built"
                hit_s, _, stats_hit = run_once(tmp, cache_dir, workers, packing, tokenizer, template)
                assert stats_hit["cache"] == "hit"
                n = args.records
                print(f"{workers:>7} {str(packing):>7} {build_s:>8.1f} {n / build_s:>16,.0f} {build_cpu:>7.1f} "
                      f"{n / build_cpu:>14,.0f} {hit_s:>9.2f} {n / hit_s:>17,.0f} {stats['train']['tokens']:>11,}")
                shutil.rmtree(cache_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
