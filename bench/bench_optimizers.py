"""Optimizer memory on CPU: full fine-tuning of the same model with AdamW and with GaLore, APOLLO (whole-model
and layerwise), BAdam, Adam-mini and Muon, each in a fresh process through the real pipeline.

Per optimizer: the bytes of tensors held in the optimizer state after the run (moments, projections; for
BAdam the active block's fp32 copies too), the peak RSS of the process (``ru_maxrss``: model, gradients,
state, activations), tokens/s, and the loss; then the ratio of each to AdamW's. Model: ``medium`` of
bench_train.py (Qwen3, hidden 1024, 8 layers, ~97M parameters); identity + alpaca_en_demo, cutoff_len 128,
micro-batch 2, no accumulation (the layerwise variants need none), gradient checkpointing on.

    python bench/bench_optimizers.py --out bench/RESULTS-optimizers.md
    python bench/bench_optimizers.py --model small --steps 3           # quick look
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
sys.path.insert(0, HERE)

OPTIMIZERS = {
    "adamw": {},
    "galore": dict(use_galore=True, galore_rank=64, galore_update_interval=200),
    "galore_layerwise": dict(use_galore=True, galore_rank=64, galore_update_interval=200, galore_layerwise=True),
    "apollo": dict(use_apollo=True, apollo_rank=64, apollo_update_interval=200),
    "apollo_layerwise": dict(use_apollo=True, apollo_rank=64, apollo_update_interval=200, apollo_layerwise=True),
    "badam": dict(use_badam=True, badam_switch_interval=50),
    "adam_mini": dict(use_adam_mini=True),
    "muon": dict(use_muon=True),
}


def _state_bytes(optimizer) -> int:
    import torch

    total = 0
    for sub in getattr(optimizer, "optimizers", [optimizer]):
        base = getattr(sub, "base_optimizer", None)
        if base is not None:  # BAdam: the AdamW of the active block, and its fp32 copies of that block
            total += sum(p.numel() * p.element_size() for p in getattr(sub, "param_idx2hp", {}).values())
            sub = base
        for state in sub.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    total += value.numel() * value.element_size()
                elif torch.is_tensor(getattr(value, "ortho_matrix", None)):
                    total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
    return total


def child(args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from bench_train import _model_dir

    from lmf.config.parser import build_config
    from lmf.data.collator import SFTCollator
    from lmf.model.loader import load_model
    from lmf.train.sft import SFTObjective
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer
    from lmf.train.workflow import load_tokenizer_and_data

    out = tempfile.mkdtemp(prefix="lmf-bench-optim-")
    cfg = build_config(dict(
        model_name_or_path=_model_dir(args.model), stage="sft", finetuning_type="full", template="qwen",
        dataset_dir=os.path.join(REPO, "examples", "data"), dataset="identity,alpaca_en_demo", cutoff_len=128,
        output_dir=out, overwrite_output_dir=True, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-4, max_steps=args.warmup + args.steps, save_strategy="no", logging_steps=1,
        disable_tqdm=True, report_to="none", max_grad_norm=0, **OPTIMIZERS[args.optimizer],
    ))
    runtime = setup_runtime(cfg)
    set_seed(0)
    tokenizer, _, data = load_tokenizer_and_data(cfg, "sft")
    model = load_model(cfg, tokenizer, is_trainable=True)
    trainer = Trainer(cfg, model, tokenizer, SFTObjective(cfg, model, SFTCollator(tokenizer)), data.train_dataset, runtime)
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
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    params = sum(p.numel() for p in model.parameters())
    return {"optimizer": args.optimizer, "params": params, "state_mib": _state_bytes(trainer.run.optimizer) / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tok_per_s": (state.tokens_seen - marks["tokens"]) / (time.perf_counter() - marks["wall"]),
            "loss_first": losses[0], "loss_last": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="medium", choices=("small", "medium"))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write a Markdown report here")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = []
    for name in args.optimizers.split(","):
        cmd = [sys.executable, __file__, "--child", "--optimizer", name, "--model", args.model, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        print(f"{name:18s} state {row['state_mib']:8.1f} MiB  peak RSS {row['peak_rss_mib']:7.0f} MiB  "
              f"{row['tok_per_s']:6.0f} tok/s  loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}", flush=True)
    report = _report(rows, args)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report)
        print(f"wrote {args.out}")


def _report(rows: list[dict], args) -> str:
    base = next((r for r in rows if r["optimizer"] == "adamw"), rows[0])
    cmd = "python bench/bench_optimizers.py" + (f" --model {args.model}" if args.model != "medium" else "") + \
        (f" --steps {args.steps}" if args.steps != 4 else "") + (f" --out {args.out}" if args.out else "")
    lines = ["# Optimizer memory (CPU)", "", f"`{cmd}`", "",
             f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; model {args.model} "
             f"({base['params']:,} parameters, full fine-tuning, fp32), cutoff_len 128, micro-batch 2, no "
             f"accumulation, {args.steps} timed steps after {args.warmup}. State: tensor bytes held by the "
             "optimizer after the run; peak RSS: ru_maxrss of the process.", "",
             "| optimizer | state | state vs AdamW | peak RSS | peak RSS vs AdamW | tok/s | loss first -> last |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['state_mib']:.1f} MiB | {r['state_mib'] / base['state_mib']:.2f}x | "
                     f"{r['peak_rss_mib']:.0f} MiB | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | "
                     f"{r['tok_per_s']:.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
