#!/usr/bin/env python
"""lmf vs LLaMA-Factory 0.9.5 on the same machine, in one run: start-up, preprocessing, training.

    python bench/compare_lf.py                       # CPU sections (startup, preprocess, train), ~8 min on 2 cores
    python bench/compare_lf.py --quick               # smaller sizes, a couple of minutes
    python bench/compare_lf.py --sections startup,preprocess
    python bench/compare_lf.py --sections gpu        # GPU section (needs CUDA)

Run it with lmf's Python (the venv where lmf is installed). LLaMA-Factory lives in its own venv,
bench/.lf-venv, created by ``bash bench/lf_venv.sh`` (run automatically when missing); each side
runs in its own fresh subprocess (bench/compare_lf_sides/{lmf,lf}_side.py) and never imports the
other. The report goes to bench/RESULTS.md (``--report``) and the raw numbers to a JSON file.

Honesty: both sides get the same model directory, tokenizer, data file, template (LLaMA-Factory's
``qwen``), cutoff_len, batch size, accumulation, LoRA settings, optimizer, worker count and thread
count. The tokenized datasets are compared (row count, token and label-token totals, and a sha256
over every row's tokens and labels); training throughput counts the non-pad tokens of the data
each side actually trained on (one full epoch of the same records, checked against each trainer's
own token counter). Any mismatch is printed in the report, never hidden.

GPU section on an H100 machine WITHOUT internet (its own python 3.12 with a CUDA torch)
----------------------------------------------------------------------------------------
The prepared run for the device tool's GPU machine is ``bash bench/gpu_check.sh`` (bench/README.md): it installs
the carried wheels and measures more than this section (full SFT, 8192 tokens, MFU, the context probe, the gpu
tests). By hand, this section alone:

1. On a machine with internet (pip downloads cp312 manylinux wheels whatever its own python is);
   gpu-freeze.txt (optional) is `python -m pip freeze` run on the GPU machine: general-purpose
   libraries it already has (numpy, pyarrow, pandas, ...) are skipped at any version, the core ones
   (transformers, peft, datasets, ...) only at the pinned version. Note the device tool carries at
   most 64 MiB: pyarrow alone is 53 MiB, so the GPU machine must already have pyarrow:

       bash bench/fetch_gpu_wheels.sh gpu-freeze.txt   # -> ./.whl: LLaMA-Factory 0.9.5 + what it imports
                                                        #    for text SFT; 107 MiB when nothing is skipped
                                                        #    (pyarrow 53, numpy 16, pandas 12, transformers 10)

2. Carry the repository (with ./.whl) to the GPU machine; there, from the repository root:

       python -m venv --system-site-packages bench/.lf-venv
       bench/.lf-venv/bin/pip install --no-index --no-deps .whl/*.whl
       rm -f bench/.lf-venv/lib/python3*/site-packages/torchaudio/lib/*.so     # why: bench/lf_venv.sh
       bench/.lf-venv/bin/python -c "import llamafactory.train.tuner"            # smoke test

   lmf side: no install needed, ``export PYTHONPATH=$PWD/src`` (an editable install would need
   setuptools from an index). If the machine's python lacks transformers, peft or datasets, give lmf
   the same wheels in a venv of its own (lmf runs on LLaMA-Factory's pins too: transformers 5.6,
   peft 0.18.1, datasets 4.0 -- checked on CPU) and pass ``--lmf-python bench/.cache/lmf-venv/bin/python``:

       python -m venv --system-site-packages bench/.cache/lmf-venv
       bench/.cache/lmf-venv/bin/pip install --no-index --no-deps $(ls .whl/*.whl | grep -v llamafactory)
       rm -f bench/.cache/lmf-venv/lib/python3*/site-packages/torchaudio/lib/*.so

3. Run (about 5 min on an H100; add --quick for about 2):

       export PYTHONPATH=$PWD/src
       python bench/compare_lf.py --sections gpu --report $OUT/RESULTS-gpu.md --json $OUT/gpu.json

   It builds bench/.cache/compare_lf/models/qwen3-0.5b-random (hidden 896, 24 layers, 14 heads,
   2 kv heads, intermediate 4864, vocab 151936, tied embeddings: 494M params, random init, bf16),
   then trains LoRA SFT with bf16 and sdpa attention on both sides, without and with packing.
   Paste RESULTS-gpu.md into bench/RESULTS.md.

``--peak-flops`` (default 989e12, H100 SXM dense bf16) sets the MFU denominator:
MFU = 6 * params * tokens/s / peak_flops, params = all model parameters (frozen included),
tokens = non-pad tokens trained. LoRA needs fewer FLOPs than 6*N per token (no weight gradients for
frozen weights) and gradient checkpointing recomputes the forward, so this is the usual "model
FLOPs" convention, the same for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
SIDES = os.path.join(BENCH, "compare_lf_sides")
DEMO_DATA = os.path.join(REPO, "examples", "data")
TEMPLATE = "qwen"
SECTIONS = ("startup", "preprocess", "train", "gpu", "context", "shape", "realdata", "scaling")
REAL_SECTIONS = ("context", "shape", "realdata", "scaling")  # bench/compare_lf_real.py: the real-vocabulary shape
TARGETS = {"startup": 10.0, "preprocess": 3.0, "train_speed": 1.2, "train_rss": 0.8}

# Model shapes. The CPU one is small enough to train in seconds on 2 cores; the GPU one is the
# Qwen2.5-0.5B shape on the Qwen3 architecture (~0.49B params with tied embeddings), random init.
TINY_TRAIN_SHAPE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384)
GPU_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, head_dim=64, tie_word_embeddings=True,
                 max_position_embeddings=32768)


# ----------------------------------------------------------------------------- plumbing
def log(msg: str) -> None:
    print(f"[compare_lf {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def side_env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DISABLE_VERSION_CHECK="1", LLAMAFACTORY_VERBOSITY="WARN", WANDB_DISABLED="true")
    env.pop("FORCE_TORCHRUN", None)
    env.update(extra or {})
    return env


def run_side(side: str, python: str, action: str, config: dict, work: str, name: str, threads: int,
             env_extra: dict | None = None, vision: bool = False, timeout: float | None = None,
             spec_extra: dict | None = None) -> dict:
    """Run one side in a fresh process; return its result dict (plus wall time and log path).

    ``timeout`` (seconds) kills a side that runs longer (RuntimeError); ``spec_extra`` adds keys to the spec."""
    os.makedirs(work, exist_ok=True)
    spec_path = os.path.join(work, f"{name}.spec.json")
    result_path = os.path.join(work, f"{name}.result.json")
    log_path = os.path.join(work, f"{name}.log")
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump({"action": action, "config": config, "vision": vision, **(spec_extra or {})}, fh, indent=1)
    if os.path.exists(result_path):
        os.remove(result_path)
    script = os.path.join(SIDES, "lf_side.py" if side == "lf" else "lmf_side.py")
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as logfh:
        try:
            proc = subprocess.run([python, script, spec_path, result_path], cwd=REPO, stdout=logfh,
                                  stderr=subprocess.STDOUT, env=side_env(threads, env_extra), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc = None
    wall = time.perf_counter() - start
    if proc is None:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-2000:]
        raise RuntimeError(f"{side} {action} ({name}) was stopped at its time cap of {timeout:.0f} s; log {log_path}:\n{tail}")
    if proc.returncode != 0 or not os.path.exists(result_path):
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"{side} {action} ({name}) failed with exit code {proc.returncode}; log {log_path}:\n{tail}")
    with open(result_path, encoding="utf-8") as fh:
        result = json.load(fh)
    result.update(wall_seconds=wall, log=os.path.relpath(log_path, REPO))
    return result


def ensure_lf_venv(lf_python: str) -> None:
    if os.path.exists(lf_python):
        return
    if os.path.abspath(lf_python) != os.path.join(BENCH, ".lf-venv", "bin", "python"):
        raise SystemExit(f"--lf-python {lf_python} does not exist")
    log("bench/.lf-venv missing: creating it with bench/lf_venv.sh (a few minutes)")
    subprocess.run(["bash", os.path.join(BENCH, "lf_venv.sh")], check=True)


def safetensors_params(model_dir: str) -> int:
    """Parameter count read from the safetensors headers (no torch needed)."""
    total = 0
    for fname in sorted(os.listdir(model_dir)):
        if fname.endswith(".safetensors"):
            with open(os.path.join(model_dir, fname), "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
            for key, meta in header.items():
                if key != "__metadata__":
                    n = 1
                    for d in meta["shape"]:
                        n *= d
                    total += n
    return total


def build_models(lmf_python: str, cache: str, which: str) -> str:
    """Build (once) the model directory for 'tiny' (CPU train/preprocess) or 'gpu' (0.5B)."""
    out = os.path.join(cache, "models", "tiny-qwen3-train" if which == "tiny" else "qwen3-0.5b-random")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    log(f"building {which} model in {os.path.relpath(out, REPO)}")
    if which == "tiny":
        code = ("import sys; from lmf.testing.tiny import build_tiny_model; "
                f"build_tiny_model(sys.argv[1], arch='qwen3', seed=0, **{TINY_TRAIN_SHAPE!r})")
    else:
        code = (
            "import sys, torch\n"
            "from transformers import AutoModelForCausalLM, Qwen3Config, GenerationConfig\n"
            "from lmf.testing.tiny import build_tokenizer\n"
            "tok = build_tokenizer()\n"
            f"cfg = Qwen3Config(**{GPU_SHAPE!r})\n"
            "cfg.bos_token_id = None; cfg.eos_token_id = tok.eos_token_id; cfg.pad_token_id = tok.pad_token_id\n"
            "torch.manual_seed(0)\n"
            "model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16)\n"
            "model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)\n"
            "model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])\n"
        )
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([lmf_python, "-c", code, tmp], check=True, cwd=REPO, env=side_env(2))
    os.replace(tmp, out)
    return out


def replicate_alpaca(cache: str, records: int) -> str:
    """dataset_dir holding ``alpaca_bench`` = alpaca_en_demo replicated to ``records`` records."""
    out_dir = os.path.join(cache, f"data-{records}")
    path = os.path.join(out_dir, "alpaca_bench.json")
    if not os.path.exists(path):
        with open(os.path.join(DEMO_DATA, "alpaca_en_demo.json"), encoding="utf-8") as fh:
            demo = json.load(fh)
        write_dataset_dir(out_dir, "alpaca_bench", [demo[i % len(demo)] for i in range(records)])
    return out_dir


def write_dataset_dir(out_dir: str, name: str, rows: list[dict]) -> None:
    """``out_dir`` with ``<name>.json`` (``rows``, written atomically) registered in a dataset_info.json."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(rows, fh, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump({name: {"file_name": f"{name}.json"}}, fh)


def write_long_records(out_dir: str, corpus: str, cutoff_len: int, records: int) -> str:
    """``out_dir`` with ``long_sft``: ``records`` records of a short instruction and an output of ``corpus`` prose longer
    than ``cutoff_len`` tokens (distinct offsets), so every sample is cut to exactly cutoff_len tokens on both sides.
    Callers reuse an ``out_dir`` that has it already (before reading their corpus)."""
    chars = cutoff_len * 6  # English prose: ~4.5 characters per Qwen token
    rows = []
    for i in range(records):
        start = (i * 7919 * 31) % len(corpus)
        text = (corpus[start:] + "\n\n" + corpus) * (1 + chars // len(corpus))
        rows.append({"instruction": f"Continue the article (part {i + 1}).", "input": "", "output": text[:chars]})
    write_dataset_dir(out_dir, "long_sft", rows)
    return out_dir


def best_run(runs: list[dict], time_key: str) -> dict:
    """The run with the smallest ``time_key``, with ``all_<time_key>`` (every run's time) and the peak RSS
    of all the runs."""
    best = dict(min(runs, key=lambda r: r[time_key]))
    best[f"all_{time_key}"] = [r[time_key] for r in runs]
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return best


def ratio(a, b):
    return a / b if a and b else float("nan")


# ----------------------------------------------------------------------------- sections
def bench_startup(args) -> dict:
    lmf_bin = shutil.which("lmf", path=os.path.dirname(args.lmf_python)) or os.path.join(os.path.dirname(args.lmf_python), "lmf")
    lf_bin = os.path.join(os.path.dirname(args.lf_python), "llamafactory-cli")
    runs = 3 if args.quick else 5
    out = {"runs": runs, "commands": {}}
    for sub in ("help", "version"):
        times = {}
        samples: dict = {"lmf": [], "lf": []}
        for i in range(runs + 1):  # the first round warms the page cache and is discarded
            for side, binary in (("lmf", lmf_bin), ("lf", lf_bin)):  # interleaved: both see the same machine load
                cmd = [binary, sub]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=side_env(args.threads))
                dt = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
                if i:
                    samples[side].append(dt)
        for side, xs in samples.items():
            times[side] = {"median_s": statistics.median(xs), "min_s": min(xs), "samples": xs}
        out["commands"][sub] = dict(times, speedup=ratio(times["lf"]["median_s"], times["lmf"]["median_s"]),
                                    lmf_cmd=f"lmf {sub}", lf_cmd=f"llamafactory-cli {sub}")
        log(f"startup {sub}: lmf {times['lmf']['median_s']*1000:.0f} ms, LF {times['lf']['median_s']*1000:.0f} ms "
            f"-> {out['commands'][sub]['speedup']:.1f}x")
    return out


def base_config(model_dir: str, dataset_dir: str, dataset: str, cutoff_len: int, workers: int, output_dir: str) -> dict:
    return {
        "model_name_or_path": model_dir, "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
        "dataset_dir": dataset_dir, "dataset": dataset, "template": TEMPLATE, "cutoff_len": cutoff_len,
        "overwrite_cache": True, "preprocessing_num_workers": workers,
        "output_dir": output_dir, "overwrite_output_dir": True, "report_to": "none", "seed": 42,
    }


def compare_stats(a: dict, b: dict, keys=("rows", "real_tokens", "label_tokens", "digest")) -> list[str]:
    """Human-readable differences between two token_stats dicts (empty list = identical)."""
    return [f"{k}: lmf {a.get(k)} vs LF {b.get(k)}" for k in keys if k in a and k in b and a[k] != b[k]]


def bench_preprocess(args, model_dir: str) -> dict:
    records = args.records or (5000 if args.quick else 20000)
    repeats = args.repeats or (1 if args.quick else 2)
    data_dir = replicate_alpaca(args.cache, records)
    work = os.path.join(args.cache, "runs", "preprocess")
    shutil.rmtree(work, ignore_errors=True)
    runs: dict = {"lmf": [], "lf": []}
    for rep in range(repeats):  # interleaved repeats, each in a fresh process with fresh caches; the fastest is kept
        for side, python in (("lmf", args.lmf_python), ("lf", args.lf_python)):
            name = f"preprocess-{side}-{rep}"
            cfg = base_config(model_dir, data_dir, "alpaca_bench", args.cutoff_len, args.workers,
                              os.path.join(work, f"{name}-out"))
            hf_cache = os.path.join(work, f"{name}-hf-datasets-cache")  # fresh: no Arrow cache from earlier runs
            if side == "lmf":
                cfg["preprocessing_cache_dir"] = os.path.join(work, f"{name}-lmf-cache")
            log(f"preprocess {side} #{rep + 1}: {records} records, cutoff_len {args.cutoff_len}, workers {args.workers}")
            res = run_side(side, python, "preprocess", cfg, work, name, args.threads,
                           {"HF_DATASETS_CACHE": hf_cache, "LMF_CACHE": os.path.join(work, f"{name}-lmf-home")})
            res["samples_per_s"] = records / res["seconds"]
            runs[side].append(res)
            log(f"preprocess {side}: {res['seconds']:.1f} s = {res['samples_per_s']:.0f} samples/s, {res['stats']}")
    results = {side: best_run(runs[side], "seconds") for side in ("lmf", "lf")}
    mismatch = compare_stats(results["lmf"]["stats"], results["lf"]["stats"])
    for side in ("lmf", "lf"):  # every run of a side must produce the same tokens
        digests = {r["stats"].get("digest") for r in runs[side]}
        if len(digests) != 1:
            mismatch.append(f"{side}'s repeated runs produced different data: {sorted(digests)}")
    return {"records": records, "cutoff_len": args.cutoff_len, "workers": args.workers, "repeats": repeats,
            "sides": results, "speedup": ratio(results["lmf"]["samples_per_s"], results["lf"]["samples_per_s"]),
            "mismatch": mismatch}


def train_settings(args, gpu: bool) -> dict:
    if gpu:
        records = 1024 if args.quick else 4096
        return dict(records=records, dataset="alpaca_bench", data_dir=replicate_alpaca(args.cache, max(records, 1000)),
                    batch=8, accum=2, cutoff_len=2048, lr=1e-4)
    records = 48 if args.quick else 96
    return dict(records=records, dataset="alpaca_en_demo", data_dir=DEMO_DATA, batch=4, accum=2,
                cutoff_len=args.cutoff_len, lr=1e-4)


def train_config(args, s: dict, model_dir: str, output_dir: str, packing: bool, gpu: bool) -> dict:
    cfg = base_config(model_dir, s["data_dir"], s["dataset"], s["cutoff_len"], 1, output_dir)
    per_step = s["batch"] * s["accum"]
    cfg.update({
        "max_samples": s["records"], "per_device_train_batch_size": s["batch"], "gradient_accumulation_steps": s["accum"],
        "learning_rate": s["lr"], "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "optim": "adamw_torch",
        "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 5, "save_strategy": "no", "plot_loss": False,
        "disable_tqdm": True, "dataloader_num_workers": 0, "packing": packing, "neat_packing": False,
    })
    if packing:
        cfg.update({"num_train_epochs": 1.0, "max_steps": -1})  # packed row counts may differ: train one epoch
    else:
        cfg.update({"max_steps": s["records"] // per_step, "num_train_epochs": 1.0})  # == exactly one epoch
    if gpu:
        cfg.update({"bf16": True, "flash_attn": "sdpa"})  # same attention kernels on both sides
    else:
        cfg["use_cpu"] = True
    return cfg


def bench_train(args, model_dir: str, gpu: bool) -> dict:
    s = train_settings(args, gpu)
    repeats = args.repeats or (1 if args.quick or gpu else 2)  # the GPU machine is not shared
    params = safetensors_params(model_dir)
    section = "gpu" if gpu else "train"
    work = os.path.join(args.cache, "runs", section)
    shutil.rmtree(work, ignore_errors=True)
    out = {"settings": {k: v for k, v in s.items() if k != "data_dir"}, "params": params, "repeats": repeats,
           "variants": {}}
    for packing in (False, True):
        variant = "packing" if packing else "no packing"
        runs: dict = {"lmf": [], "lf": []}
        for rep in range(repeats):  # interleaved repeats; the fastest train loop of each side is kept
            for side, python in (("lmf", args.lmf_python), ("lf", args.lf_python)):
                name = f"{section}-{'pack' if packing else 'nopack'}-{side}-{rep}"
                cfg = train_config(args, s, model_dir, os.path.join(work, f"{name}-out"), packing, gpu)
                extra = {"HF_DATASETS_CACHE": os.path.join(work, f"{name}-hf-cache"),
                         "LMF_CACHE": os.path.join(work, f"{name}-lmf-cache")}
                if side == "lf":
                    cfg["include_num_input_tokens_seen"] = "non_padding"  # LF/HF's own counter, cross-check only
                log(f"{section} {variant} {side} #{rep + 1}: {s['records']} records, batch {s['batch']}x{s['accum']}, "
                    f"cutoff {s['cutoff_len']}")
                runs[side].append(run_side(side, python, "train", cfg, work, name, args.threads, extra))
                log(f"  {side}: {runs[side][-1]['train_seconds']:.1f} s train loop, wall {runs[side][-1]['wall_seconds']:.1f} s")
        res = {}
        for side in ("lmf", "lf"):
            r = best_run(runs[side], "train_seconds")
            r["wall_seconds"] = min(x["wall_seconds"] for x in runs[side])
            epoch = r.get("epoch") or 0.0
            if side == "lf" and packing:
                # LF's packed rows (neat_packing off) carry padding with attention_mask 1, so HF's counter
                # would include pads: count the packed data's non-pad tokens times the epochs trained.
                r["tokens_trained"] = r["data"]["real_tokens"] * epoch
            else:  # the trainer's own attention-mask count over every micro-batch it trained on
                r["tokens_trained"] = r["trainer_tokens"]
            r["tokens_per_s"] = r["tokens_trained"] / r["train_seconds"]
            if gpu:
                r["mfu"] = 6.0 * params * r["tokens_per_s"] / args.peak_flops
            res[side] = r
            log(f"  best {side}: {r['train_seconds']:.1f} s train loop, {r['tokens_per_s']:.0f} tok/s, "
                f"steps {r['global_step']}, epoch {epoch:.3f}, peak RSS {r['peak_rss_mib']:.0f} MiB, data {r['data']}")
        problems = compare_stats(res["lmf"]["data"], res["lf"]["data"], ("real_tokens", "label_tokens"))
        for side in ("lmf", "lf"):
            r = res[side]
            if abs((r.get("epoch") or 0) - 1.0) > 1e-3:
                problems.append(f"{side} trained {r.get('epoch')} epochs ({r['global_step']} steps), not exactly 1: its "
                                f"tokens/s uses the {r['tokens_trained']:.0f} tokens it really trained "
                                f"(one epoch = {r['data']['real_tokens']})")
        if not packing:
            counts = {res["lmf"]["trainer_tokens"], res["lf"]["trainer_tokens"], res["lmf"]["data"]["real_tokens"]}
            if len(counts) != 1:
                problems.append(f"trained token counts differ: lmf counter {res['lmf']['trainer_tokens']}, LF counter "
                                f"{res['lf']['trainer_tokens']}, one epoch of data {res['lmf']['data']['real_tokens']}")
        out["variants"][variant] = {
            "sides": res, "mismatch": problems,
            "speedup": ratio(res["lmf"]["tokens_per_s"], res["lf"]["tokens_per_s"]),
            "rss_ratio": ratio(res["lmf"]["peak_rss_mib"], res["lf"]["peak_rss_mib"]),
            "wall_ratio": ratio(res["lf"]["wall_seconds"], res["lmf"]["wall_seconds"]),
        }
        if gpu:
            out["variants"][variant]["cuda_peak_ratio"] = ratio(res["lmf"].get("cuda_peak_mib"), res["lf"].get("cuda_peak_mib"))
    return out


# ----------------------------------------------------------------------------- report
def machine_info(args) -> dict:
    def capture(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"({' '.join(cmd)} failed: {exc})"

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "lmf_env": capture([args.lmf_python, "-m", "lmf", "env"]),
        "lf_version": capture([args.lf_python, "-c", "import llamafactory, transformers, peft, datasets, torch; "
                               "print(f'llamafactory {llamafactory.__version__}, transformers {transformers.__version__}, "
                               "peft {peft.__version__}, datasets {datasets.__version__}, torch {torch.__version__}')"]),
        "git": capture(["git", "log", "-1", "--format=%h %s"]),
    }
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            info["memory"] = fh.readline().split(":")[1].strip()
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            models = [ln.split(":")[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu_model"] = models[0] if models else ""
    except OSError:
        pass
    return info


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**missed**"


def render_report(args, info: dict, results: dict) -> list[str]:
    lines = [
        "# lmf vs LLaMA-Factory 0.9.5",
        "",
        f"Generated by `{results.get('command', 'python bench/compare_lf.py')}` on {info['date']} "
        f"(git {info['git']}) in {results.get('elapsed_s', 0) / 60:.1f} min. Both sides ran on this machine in the same "
        f"run, each in a fresh process with {results.get('threads', 1)} thread(s) (OMP_NUM_THREADS).",
        "",
        *_merged_note(results),
        "## Machine and versions",
        "",
        f"- CPU: {info.get('cpu_model', '?')} ({info['cpus']} cores visible), memory {info.get('memory', '?')}",
        f"- reference: {info['lf_version']} (bench/.lf-venv)",
        "",
        "`lmf env`:",
        "",
        "```",
        info["lmf_env"],
        "```",
        "",
        "## Summary",
        "",
        "| measurement | lmf | LLaMA-Factory | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    if "startup" in results:
        for sub, r in results["startup"]["commands"].items():
            lines.append(f"| start-up `{r['lmf_cmd']}` vs `{r['lf_cmd']}` (median of {results['startup']['runs']}) | "
                         f"{r['lmf']['median_s']*1000:.0f} ms | {r['lf']['median_s']*1000:.0f} ms | {r['speedup']:.1f}x faster | "
                         f">= {TARGETS['startup']:.0f}x | {verdict(r['speedup'], TARGETS['startup'])} |")
    if "preprocess" in results:
        p = results["preprocess"]
        lines.append(f"| preprocessing, samples/s ({p['records']} records) | {p['sides']['lmf']['samples_per_s']:.0f} | "
                     f"{p['sides']['lf']['samples_per_s']:.0f} | {p['speedup']:.2f}x | >= {TARGETS['preprocess']:.0f}x | "
                     f"{verdict(p['speedup'], TARGETS['preprocess'])} |")
    for section in ("train", "gpu"):
        if section not in results:
            continue
        for variant, v in results[section]["variants"].items():
            a, b = v["sides"]["lmf"], v["sides"]["lf"]
            tag = "CPU" if section == "train" else "GPU"
            lines.append(f"| {tag} LoRA SFT {variant}, train tokens/s | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
                         f"{v['speedup']:.2f}x | >= {TARGETS['train_speed']}x | {verdict(v['speedup'], TARGETS['train_speed'])} |")
            lines.append(f"| {tag} LoRA SFT {variant}, peak RSS | {a['peak_rss_mib']:.0f} MiB | {b['peak_rss_mib']:.0f} MiB | "
                         f"{v['rss_ratio']:.2f}x | <= {TARGETS['train_rss']}x | "
                         f"{verdict(v['rss_ratio'], TARGETS['train_rss'], higher_is_better=False)} |")
            if section == "gpu":
                lines.append(f"| GPU LoRA SFT {variant}, MFU | {a['mfu']*100:.1f}% | {b['mfu']*100:.1f}% | | | |")
                if a.get("cuda_peak_mib") and b.get("cuda_peak_mib"):
                    lines.append(f"| GPU LoRA SFT {variant}, peak CUDA memory | {a['cuda_peak_mib']:.0f} MiB | "
                                 f"{b['cuda_peak_mib']:.0f} MiB | {v['cuda_peak_ratio']:.2f}x | | |")
    real = _real()
    lines += real.summary_rows(results)
    if "gpu" not in results:
        lines.append("| GPU section | not run: no CUDA device in this run | | | | |")
    lines += ["", "Ratios: start-up and wall time = LF / lmf (higher is better for lmf); throughput = lmf / LF; "
              "memory = lmf / LF (lower is better for lmf).", ""]
    problems = []
    if "preprocess" in results:
        problems += [f"preprocessing: {m}" for m in results["preprocess"]["mismatch"]]
    for section in ("train", "gpu"):
        for variant, v in results.get(section, {}).get("variants", {}).items():
            problems += [f"{section} {variant}: {m}" for m in v["mismatch"]]
    problems += real.problems(results)
    if not any(k in results for k in ("preprocess", "train", "gpu") + REAL_SECTIONS):
        return lines + _details(results)
    lines += ["## Same work on both sides (honesty checks)", ""]
    if problems:
        lines += ["Differences found (reported, not hidden):", ""] + [f"- {p}" for p in problems] + [""]
    else:
        lines += ["No differences: identical tokenized data (rows, non-pad tokens, label tokens; token-for-token "
                  "sha256 for the unpacked preprocessing output) and equal trained token counts.", ""]
    return lines + _details(results)


def _merged_note(results: dict) -> list[str]:
    """With --merge, sections measured by other invocations: name them (each section's details say its command)."""
    own = results.get("command")
    others = [f"`{name}`: `{results[name]['command']}` ({results[name].get('date')})" for name in SECTIONS
              if isinstance(results.get(name), dict) and results[name].get("command") not in (None, own)]
    return (["Sections measured by other invocations of the same script (merged with --merge): " + "; ".join(others)
             + ".", ""] if others else [])


def _details(results: dict) -> list[str]:
    lines = ["## Details", ""]
    if "startup" in results:
        lines += ["### 1. CLI start-up", "",
                  "Wall time of the console script (`lmf` in lmf's venv, `llamafactory-cli` in bench/.lf-venv), "
                  "one discarded warm-up run, then the median.", ""]
        for sub, r in results["startup"]["commands"].items():
            lines.append(f"- `{sub}`: lmf {', '.join(f'{t*1000:.0f}' for t in r['lmf']['samples'])} ms; "
                         f"LF {', '.join(f'{t*1000:.0f}' for t in r['lf']['samples'])} ms")
        lines.append("")
    if "preprocess" in results:
        p = results["preprocess"]
        lines += ["### 2. Preprocessing", "",
                  f"alpaca_en_demo replicated to {p['records']} records (one JSON file registered in a dataset_info.json), "
                  f"template `{TEMPLATE}`, cutoff_len {p['cutoff_len']}, preprocessing_num_workers {p['workers']}, "
                  "overwrite_cache and fresh cache folders. Timed: each side's own `get_dataset` (read + convert + "
                  f"tokenize/template/mask + materialise), after the tokenizer is loaded. Each side ran "
                  f"{p.get('repeats', 1)} time(s) in a fresh process, interleaved with the other; the fastest run is "
                  "shown (all runs in the last column), peak RSS is the maximum over the runs.", "",
                  "| side | seconds | samples/s | rows | tokens | non-pad tokens | label tokens | max length | sha256[:16] | peak RSS "
                  "| all runs, s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for side, label in (("lmf", "lmf"), ("lf", "LLaMA-Factory")):
            r = p["sides"][side]
            st = r["stats"]
            lines.append(f"| {label} | {r['seconds']:.2f} | {r['samples_per_s']:.0f} | {st['rows']} | {st['tokens']} | "
                         f"{st['real_tokens']} | {st['label_tokens']} | {st['max_length']} | `{st['digest']}` | "
                         f"{r['peak_rss_mib']:.0f} MiB | "
                         f"{', '.join(f'{x:.2f}' for x in r.get('all_seconds', [r['seconds']]))} |")
        lines.append("")
    for section, title in (("train", "### 3. Training (CPU)"), ("gpu", "### 4. Training (GPU)")):
        if section not in results:
            continue
        t = results[section]
        s = t["settings"]
        lines += [title, "",
                  f"LoRA SFT (rank 8, all linear layers), {t['params']/1e6:.2f}M-parameter Qwen3-architecture model built "
                  f"locally, dataset `{s['dataset']}` first {s['records']} records, batch {s['batch']} x accumulation "
                  f"{s['accum']}, cutoff_len {s['cutoff_len']}, adamw_torch, lr {s['lr']}, cosine, seed 42, "
                  "each side's default gradient checkpointing and loss. Without packing: max_steps = records / "
                  "(batch x accumulation), exactly one epoch; with packing (neat_packing off on both): num_train_epochs 1. "
                  "tokens/s = non-pad tokens of the trained data / time inside the trainer's `train()` call; "
                  "wall = whole process (imports, data, model load, training, save). "
                  f"Each side ran {t.get('repeats', 1)} time(s), interleaved with the other; the run with the fastest train loop "
                  "is shown (all train-loop times in the last column), peak RSS is the maximum over the runs.", "",
                  "| variant | side | train s | wall s | steps | epoch | non-pad tokens | trainer token counter | "
                  "tokens/s | loss first/last | peak RSS |" + (" peak CUDA | MFU |" if section == "gpu" else "") + " all runs, train s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if section == "gpu" else "") + "---|"]
        for variant, v in t["variants"].items():
            for side, label in (("lmf", "lmf"), ("lf", "LLaMA-Factory")):
                r = v["sides"][side]
                fl = f"{r['first_loss']:.3f}/{r['last_loss']:.3f}" if r.get("first_loss") is not None else "-"
                row = (f"| {variant} | {label} | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['global_step']} | "
                       f"{r['epoch']:.3f} | {r['tokens_trained']:.0f} | {r.get('trainer_tokens')} | {r['tokens_per_s']:.0f} | "
                       f"{fl} | {r['peak_rss_mib']:.0f} MiB |")
                if section == "gpu":
                    row += f" {r.get('cuda_peak_mib') or 0:.0f} MiB | {r['mfu']*100:.1f}% |"
                row += " " + ", ".join(f"{x:.1f}" for x in r.get("all_train_seconds", [])) + " |"
                lines.append(row)
            lines.append(f"| {variant} | ratio | | {v['wall_ratio']:.2f}x faster | | | | | {v['speedup']:.2f}x | | "
                         f"{v['rss_ratio']:.2f}x |" + (" | |" if section == "gpu" else "") + " |")
        lines.append("")
    return lines + _real().details(results)


def _real():
    import compare_lf_real

    return compare_lf_real


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} "
                   "(default: startup,preprocess,train, plus gpu when CUDA is available)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (5k records, fewer steps and runs)")
    p.add_argument("--lf-python", default=os.path.join(BENCH, ".lf-venv", "bin", "python"))
    p.add_argument("--lmf-python", default=sys.executable)
    p.add_argument("--records", type=int, default=None, help="records for the preprocessing section (default 20000; 5000 with --quick)")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="preprocessing_num_workers (both sides)")
    p.add_argument("--repeats", type=int, default=None, help="preprocessing and training runs per side, interleaved; "
                   "the fastest is reported (default 2 on CPU; 1 with --quick and for gpu): the machine may be shared")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every benchmarked process")
    p.add_argument("--peak-flops", type=float, default=989e12, help="accelerator peak (bf16 dense) for MFU")
    p.add_argument("--cache", default=os.path.join(BENCH, ".cache", "compare_lf"))
    p.add_argument("--report", default=None, help="markdown report (default: bench/RESULTS.md; with --quick "
                   "<cache>/RESULTS-quick.md, so a quick run never overwrites the real results)")
    p.add_argument("--json", default=None, help="raw results (default: <cache>/results.json)")
    p.add_argument("--render", metavar="JSON", default=None, help="only re-render the report from a results JSON")
    p.add_argument("--merge", action="store_true", help="keep the sections of the existing results JSON that this "
                   "run does not measure (each section records its own command, date and git commit)")
    p.add_argument("--replace-report", action="store_true", help="write the report even when it has fewer sections "
                   "than the one it replaces (by default it goes to <report>.new and the run exits 3)")
    p.add_argument("--reuse", action="store_true", help="context/shape: reuse a run whose result exists for the same "
                   "keys in <cache>/runs (resume an interrupted long benchmark)")
    p.add_argument("--budgets", default="4,8,16", help="context: peak-RSS budgets, GiB")
    p.add_argument("--context-steps", type=int, default=2, help="context: training steps of every measured run")
    p.add_argument("--context-max-len", type=int, default=98304, help="context: the longest cutoff_len tried (a "
                   "CPU step at 96k tokens takes minutes); a side reaching it is reported as >= it")
    p.add_argument("--context-threads", type=int, default=2, help="context: OMP threads (memory, not time, is measured)")
    p.add_argument("--shape-repeats", type=int, default=2, help="shape: interleaved runs per side; the fastest is kept")
    return p.parse_args(argv)


def cuda_available(python: str) -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.lf_python = os.path.abspath(args.lf_python)
    if args.render:
        with open(args.render, encoding="utf-8") as fh:
            results = json.load(fh)
        return write_report(args, results)
    if args.sections:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    else:
        sections = ["startup", "preprocess", "train"] + (["gpu"] if cuda_available(args.lmf_python) else [])
    if "gpu" in sections and not cuda_available(args.lmf_python):
        raise SystemExit("section gpu needs CUDA, and torch.cuda.is_available() is False here")
    ensure_lf_venv(args.lf_python)
    os.makedirs(args.cache, exist_ok=True)
    started = time.perf_counter()
    results: dict = {}
    if "startup" in sections:
        results["startup"] = bench_startup(args)
    if "preprocess" in sections or "train" in sections:
        tiny = build_models(args.lmf_python, args.cache, "tiny")
        if "preprocess" in sections:
            results["preprocess"] = bench_preprocess(args, tiny)
        if "train" in sections:
            results["train"] = bench_train(args, tiny, gpu=False)
    if "gpu" in sections:
        results["gpu"] = bench_train(args, build_models(args.lmf_python, args.cache, "gpu"), gpu=True)
    json_path = args.json or os.path.join(args.cache, "results.json")
    info = machine_info(args)
    for section in ("startup", "preprocess", "train", "gpu"):
        if section in results:
            results[section].update(command=" ".join(["python bench/compare_lf.py"] + sys.argv[1:]), date=info["date"])
    if any(s in sections for s in REAL_SECTIONS):
        import compare_lf_real as real

        model_dir = real.build_real_model(args.lmf_python, args.cache)
        for section in REAL_SECTIONS:
            if section in sections:
                t0 = time.perf_counter()
                results[section] = getattr(real, f"bench_{section}")(args, model_dir)
                results[section].update(command=" ".join(["python bench/compare_lf.py"] + sys.argv[1:]),
                                        date=info["date"], git=info["git"], elapsed_s=time.perf_counter() - t0)
                _save_json(json_path, results, args.merge)  # a long run keeps what it measured so far
        if "context" in results:
            real.plot_context(results, os.path.join(BENCH, "context_vs_memory.png"))
    results["machine"] = info
    results["elapsed_s"] = time.perf_counter() - started
    results["command"] = " ".join(["python bench/compare_lf.py"] + sys.argv[1:])
    results["threads"] = args.threads
    results = _save_json(json_path, results, args.merge)
    log(f"raw results in {json_path}")
    return write_report(args, results)


def _save_json(path: str, results: dict, merge: bool) -> dict:
    """Write ``results`` (with ``merge``: over the sections already in ``path``); return what was written."""
    merged = results
    if merge and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            merged = dict(json.load(fh), **results)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(merged, fh, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return merged


def write_report(args, results: dict) -> int:
    info = results["machine"]
    report = "\n".join(render_report(args, info, results)) + "\n"
    if args.report is None:
        args.report = os.path.join(args.cache, "RESULTS-quick.md") if args.quick else os.path.join(BENCH, "RESULTS.md")
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    lost = lost_sections(args.report, report)
    if lost and not args.replace_report:
        kept = args.report + ".new"
        with open(kept, "w", encoding="utf-8") as fh:
            fh.write(report)
        log(f"not overwriting {args.report}: the new report has no {', '.join(lost)} (the results JSON with them is "
            f"not the one merged: pass it with --json, or --replace-report to drop them); written to {kept}")
        return 3
    with open(args.report, "w", encoding="utf-8") as fh:
        fh.write(report)
    print(report)
    log(f"done in {results['elapsed_s']:.0f} s; report {args.report}")
    return 0


def lost_sections(path: str, report: str) -> list[str]:
    """The ``### `` section headings of the report at ``path`` that ``report`` does not have."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        old = [line.strip() for line in fh if line.startswith("### ")]
    new = {line.strip() for line in report.splitlines() if line.startswith("### ")}
    return [heading[4:] for heading in old if heading not in new]


if __name__ == "__main__":
    sys.exit(main())
