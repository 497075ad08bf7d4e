"""Preprocessing memory at scale: peak anonymous memory of lmf's data pipeline as the dataset grows.

For each size N the bench writes N Alpaca records (LLaMA-Factory's ``alpaca_en_demo.json`` replicated, each record
shortened to ~40 tokens so that millions of them tokenize in minutes, a counter in every instruction so no two are
equal) as JSON lines (``--format json`` for one JSON array), then runs in a fresh process every step between the
file and the first training batch: ``get_dataset`` (read, convert, tokenize with ``preprocessing_num_workers`` 2,
token statistics, ``packing`` when asked, save to the cache) and the first epoch's plan (the shuffled order of the
sampler, cut into ``dynamic_batching`` micro-batches). A thread samples ``RssAnon`` of that process and of its
tokenization workers every 20 ms: memory-mapped Arrow pages are file-backed and reclaimable, anonymous memory is
what a memory cap kills. Flat means the peak does not grow with N.

    python bench/bench_data_scale.py --rows 250000,1000000,4000000 --packing
    python bench/bench_data_scale.py --rows 1000000 --src /path/to/older/checkout/src   # the same on older code
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
from lmf.config.parser import build_config
from lmf.data.loader import get_dataset
from lmf.data.template import get_template
from lmf.testing.tiny import build_tokenizer
from lmf.train.batches import ResumableShardedSampler
data_dir, cache_dir, packing = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
tokenizer = build_tokenizer()
template = get_template("qwen", tokenizer)
cfg = build_config(dict(model_name_or_path="unused", dataset_dir=data_dir, dataset="big", template="qwen",
                        cutoff_len=256, preprocessing_num_workers=2, preprocessing_cache_dir=cache_dir,
                        packing=packing))
print("READY", flush=True)
start = time.perf_counter()
module = get_dataset(cfg, tokenizer, template, "sft")
built = time.perf_counter() - start
train = module.train_dataset
sampler = ResumableShardedSampler(len(train), 1, 0, shuffle=True, seed=42)
try:
    from lmf.data.stats import list_lengths
    from lmf.train.batches import TokenBudget
    micro_batches = len(TokenBudget(list_lengths(train), 256 * 8, padded=True).epoch_batches(sampler))
except ImportError:  # older code: the same steps as its build_stream takes them
    import pyarrow.compute as pc
    from lmf.train.batches import TokenBudget
    lengths = pc.list_value_length(train.with_format("arrow")[:]["input_ids"]).to_pylist()
    micro_batches = len(TokenBudget(lengths, 256 * 8, padded=True).epoch_batches(sampler))
print("RESULT " + json.dumps({"build_s": built, "plan_s": time.perf_counter() - start - built,
                              "tokens": module.stats["train"]["tokens"], "samples": len(train),
                              "micro_batches": micro_batches}), flush=True)
"""


def make_data(folder: str, rows: int, fmt: str) -> None:
    with open(os.path.join(REPO, "examples", "data", "alpaca_en_demo.json"), encoding="utf-8") as fh:
        base = [dict(instruction=r["instruction"][:60], input=r["input"][:20], output=r["output"][:80]) for r in
                json.load(fh)]
    name = "big.jsonl" if fmt == "jsonl" else "big.json"
    with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
        if fmt == "json":
            fh.write("[\n")
        for i in range(rows):
            rec = dict(base[i % len(base)])
            rec["instruction"] = f"{rec['instruction']} ({i})"
            end = "\n" if fmt == "jsonl" or i == rows - 1 else ",\n"
            fh.write(json.dumps(rec, ensure_ascii=False) + end)
        if fmt == "json":
            fh.write("]\n")
    with open(os.path.join(folder, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump({"big": {"file_name": name}}, fh)


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakSampler(threading.Thread):
    """Peak RssAnon of a process (``main``) and of it plus its descendants (``tree``), sampled every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.main, self.tree, self.stop, self.baseline = pid, 0, 0, False, None

    def run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while not self.stop:
            try:
                kids = [c.pid for c in proc.children(recursive=True)]
            except psutil.Error:
                kids = []
            main = _anon_kib(self.pid)
            self.main = max(self.main, main)
            self.tree = max(self.tree, main + sum(_anon_kib(k) for k in kids))
            time.sleep(0.02)


def run_size(rows: int, packing: bool, fmt: str, src: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="lmf-bench-scale-")
    try:
        make_data(tmp, rows, fmt)
        env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        child = subprocess.Popen([sys.executable, "-c", CHILD, tmp, os.path.join(tmp, "cache"), "1" if packing else "0"],
                                 stdout=subprocess.PIPE, text=True, env=env)
        sampler = PeakSampler(child.pid)
        result = None
        for line in child.stdout:
            if line.startswith("READY"):  # imports done, tokenizer built: what is there before any data
                sampler.baseline = _anon_kib(child.pid)
                sampler.start()
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        rc = child.wait()
        sampler.stop = True
        if rc != 0 or result is None:
            raise SystemExit(f"the pipeline failed for {rows} rows (exit {rc})")
        file_mb = os.path.getsize(os.path.join(tmp, "big.jsonl" if fmt == "jsonl" else "big.json")) / 2**20
        return dict(result, rows=rows, packing=packing, file_mib=file_mb, baseline_mib=sampler.baseline / 1024,
                    peak_main_mib=sampler.main / 1024, peak_tree_mib=sampler.tree / 1024)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="250000,1000000,4000000")
    parser.add_argument("--packing", action="store_true", help="pack (the packed dataset is what training reads)")
    parser.add_argument("--format", choices=("jsonl", "json"), default="jsonl")
    parser.add_argument("--src", default=os.path.join(REPO, "src"), help="the lmf source to measure")
    args = parser.parse_args()
    print(f"source {args.src}, format {args.format}, packing {args.packing}, {os.cpu_count()} CPUs")
    print(f"{'rows':>9} {'file MiB':>9} {'tokens':>12} {'build s':>8} {'plan s':>7} {'base MiB':>9} "
          f"{'peak main MiB':>14} {'peak tree MiB':>14} {'main B/token':>13}")
    for rows in [int(r) for r in args.rows.split(",")]:
        r = run_size(rows, args.packing, args.format, args.src)
        per_token = (r["peak_main_mib"] - r["baseline_mib"]) * 2**20 / max(r["tokens"], 1)
        print(f"{rows:>9,} {r['file_mib']:>9,.0f} {r['tokens']:>12,} {r['build_s']:>8.1f} {r['plan_s']:>7.1f} "
              f"{r['baseline_mib']:>9,.0f} {r['peak_main_mib']:>14,.0f} {r['peak_tree_mib']:>14,.0f} "
              f"{per_token:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
