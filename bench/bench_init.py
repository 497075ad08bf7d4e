"""Peak CPU memory per rank when 2 FSDP2 processes load a model: every rank reading the checkpoint (LLaMA-Factory
v1's init_on_default) against ``init_on_rank0: true`` (only rank 0 reads it; the others build the model on the meta
device and receive their shards from rank 0) and ``init_on_meta: true`` (every rank builds the parameters on meta and
copies its own shards out of the memory-mapped safetensors, one tensor at a time).

Each run is ``lmf sft`` through torchrun (2 processes, gloo, CPU) for 2 steps of full fine-tuning of the
``medium`` model of bench_train.py (~97M parameters, fp32 checkpoint ~390 MB); every rank reports its peak RSS
(``ru_maxrss``) when it exits.

    python bench/bench_init.py --out bench/RESULTS-init.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def worker() -> None:
    """What torchrun runs: lmf's worker entry point, then this rank's peak RSS into $LMF_BENCH_RSS_DIR."""
    import lmf.train.parallel as parallel
    from lmf.worker import main

    marks = {}
    original_wrap = parallel.wrap

    def wrap(*args, **kwargs):  # the peak so far, once the model is loaded and sharded
        result = original_wrap(*args, **kwargs)
        marks["loaded_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result

    parallel.wrap = wrap
    try:
        main(sys.argv[2:])
    finally:
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(os.environ["LMF_BENCH_RSS_DIR"], f"rank-{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump({"rank": int(rank), "loaded_mib": marks.get("loaded_mib", float("nan")),
                       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, fh)


def run(model_dir: str, init: str) -> list[dict]:
    import yaml

    work = tempfile.mkdtemp(prefix="lmf-bench-init-")
    cfg = dict(model_name_or_path=model_dir, stage="sft", finetuning_type="full", template="qwen",
               dataset_dir=os.path.join(REPO, "examples", "data"), dataset="identity", cutoff_len=64, max_samples=16,
               output_dir=os.path.join(work, "out"), per_device_train_batch_size=2, max_steps=2, save_strategy="no",
               fsdp="full_shard", disable_tqdm=True, report_to="none", init_on_rank0=init == "init_on_rank0", init_on_meta=init == "init_on_meta",
               preprocessing_cache_dir=os.path.join(work, "cache"))
    path = os.path.join(work, "cfg.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    rss_dir = os.path.join(work, "rss")
    os.makedirs(rss_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", LMF_BENCH_RSS_DIR=rss_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29617",
           __file__, "--worker", "sft", path]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        sys.exit(1)
    return sorted((json.load(open(f, encoding="utf-8")) for f in glob.glob(os.path.join(rss_dir, "*.json"))),
                  key=lambda r: r["rank"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="medium", choices=("small", "medium"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from bench_train import _model_dir

    model_dir = _model_dir(args.model)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(model_dir, "*.safetensors"))) / 2**20
    results = {name: run(model_dir, init) for name, init in (("every rank loads", "default"),
                                                             ("init_on_rank0", "init_on_rank0"),
                                                             ("init_on_meta", "init_on_meta"))}
    lines = ["# Model initialisation: peak RSS per rank (CPU, 2 FSDP2 processes)", "",
             f"`python bench/bench_init.py{' --out ' + args.out if args.out else ''}`", "",
             f"{platform.machine()}, {os.cpu_count()} cores; model {args.model} (checkpoint {size:.0f} MiB, fp32), "
             "full fine-tuning, 2 steps, FSDP2 full_shard on gloo.", "",
             "| loading | rank 0: peak after load + shard | rank 1: peak after load + shard | rank 0: run peak | "
             "rank 1: run peak |", "|---|---:|---:|---:|---:|"]
    for name, rows in results.items():
        lines.append(f"| {name} | {rows[0]['loaded_mib']:.0f} MiB | {rows[1]['loaded_mib']:.0f} MiB | "
                     f"{rows[0]['peak_rss_mib']:.0f} MiB | {rows[1]['peak_rss_mib']:.0f} MiB |")
        print(name, [(round(r["loaded_mib"]), round(r["peak_rss_mib"])) for r in rows])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
