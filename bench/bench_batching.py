"""Batching strategies on CPU: padding waste and training tokens/s of ``normal``, ``padding_free``,
``dynamic_batching`` and ``dynamic_padding_free`` (LLaMA-Factory v1's ``batching_strategy``) on the demo data.

Each strategy trains the bundled tiny Qwen3 (full fine-tuning) on identity + alpaca_en_demo for ``--steps`` steps
in a fresh process through the real pipeline. Padding waste: padded tokens / all tokens of the micro-batches the
run consumed, computed from the stream's own batches (padding-free strategies run no pad tokens through the model;
their waste is reported as that of their batches when padded, and as 0 computed). tokens/s counts real tokens.

    python bench/bench_batching.py --out bench/RESULTS-batching.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STRATEGIES = ("normal", "padding_free", "dynamic_batching", "dynamic_padding_free")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lmf.config.parser import build_config
    from lmf.data.collator import SFTCollator
    from lmf.model.loader import load_model
    from lmf.train.sft import SFTObjective
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer
    from lmf.train.workflow import load_tokenizer_and_data

    cfg = build_config(dict(
        model_name_or_path=os.path.join(REPO, "examples", "tiny-qwen3"), stage="sft", finetuning_type="full",
        template="qwen", dataset_dir=os.path.join(REPO, "examples", "data"), dataset="identity,alpaca_en_demo",
        cutoff_len=args.cutoff_len, output_dir=tempfile.mkdtemp(prefix="lmf-bench-batching-"),
        overwrite_output_dir=True, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
        max_steps=args.warmup + args.steps, save_strategy="no", logging_steps=1, disable_tqdm=True,
        report_to="none", batching_strategy=args.strategy,
    ))
    runtime = setup_runtime(cfg)
    set_seed(0)
    tokenizer, _, data = load_tokenizer_and_data(cfg, "sft")
    model = load_model(cfg, tokenizer, is_trainable=True)
    trainer = Trainer(cfg, model, tokenizer, SFTObjective(cfg, model, SFTCollator(tokenizer)), data.train_dataset, runtime)
    lengths = [len(ids) for ids in data.train_dataset["input_ids"]]
    marks: dict = {}
    original_step = trainer.train_step

    def step(*args_, **kwargs):
        record = original_step(*args_, **kwargs)
        if record.step == args.warmup:
            marks.update(wall=time.perf_counter(), tokens=trainer.state.tokens_seen)
        return record

    trainer.train_step = step
    trainer.checkpoints.save_final = lambda run, state: None
    state = trainer.train()
    stream = trainer.run.stream
    # the micro-batches of the epoch the run started in, as the stream formed them
    if stream.token_budget is not None:
        stream.epoch = 0
        batches = stream._budget_batches()
    else:
        stream.sampler.set_epoch(0)
        order = stream.sampler.epoch_indices()
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    samples_per_batch = sum(len(b) for b in batches) / len(batches)
    return {"strategy": args.strategy, "padding_waste": 1 - real / padded,
            "computes_padding": args.strategy in ("normal", "dynamic_batching"),
            "samples_per_micro_batch": samples_per_batch,
            "tok_per_s": (state.tokens_seen - marks["tokens"]) / (time.perf_counter() - marks["wall"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="normal", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = []
    for strategy in STRATEGIES:
        cmd = [sys.executable, __file__, "--child", "--strategy", strategy, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch-size", str(args.batch_size), "--cutoff-len", str(args.cutoff_len),
               "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{strategy}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        print(f"{strategy:22s} waste {row['padding_waste']:6.1%} ({'computed' if row['computes_padding'] else 'not run'})"
              f"  {row['samples_per_micro_batch']:5.2f} samples/micro-batch  {row['tok_per_s']:8.0f} tok/s", flush=True)
    base = rows[0]["tok_per_s"]
    lines = ["# Batching strategies (CPU)", "", f"`python bench/bench_batching.py{' --out ' + args.out if args.out else ''}`",
             "", f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; bundled tiny Qwen3, full "
             f"fine-tuning, identity + alpaca_en_demo, cutoff_len {args.cutoff_len}, micro-batch {args.batch_size} "
             f"(token budget {args.cutoff_len * args.batch_size}), {args.steps} timed steps. Padding waste: pad "
             "tokens / all tokens of the epoch's micro-batches when padded; the padding-free strategies never run "
             "them through the model.", "",
             "| strategy | padding waste of its batches | pad tokens computed | samples / micro-batch | tok/s | vs normal |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['padding_waste']:.1%} | {'yes' if r['computes_padding'] else 'no'} | "
                     f"{r['samples_per_micro_batch']:.2f} | {r['tok_per_s']:.0f} | {r['tok_per_s'] / base:.2f}x |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
