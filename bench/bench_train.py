"""Training throughput and peak memory of `lmf sft` on CPU: a fixed tiny model on the bundled demo data.

Each configuration runs in a fresh subprocess through the real pipeline (tokenizer, ``get_dataset``,
``load_model``, the shared ``Trainer``) for ``--steps`` optimizer steps after ``--warmup`` steps,
then reports:

- tokens/s (wall) and tokens per CPU-second of the process (robust to other load on a shared
  machine), counting non-pad input tokens of the timed steps;
- peak RSS of the process (``ru_maxrss``: model, data, optimizer and activations).

Models: ``bundled`` is examples/tiny-qwen3 (hidden 64, 2 layers, vocab 2048); ``small`` is a
tiny Qwen3 built with seed 0 (hidden 256, 4 layers, vocab 2048); ``medium`` one with hidden 1024,
8 layers, intermediate 2816 (~97M parameters, 96% of them in the linears QLoRA quantizes), where the
base weights dominate memory. Data: identity + alpaca_en_demo, cutoff_len 256, micro-batch 4,
accumulation 2. Finetuning types: ``lora``, ``full``, ``qlora4`` (LoRA on an NF4 base, double
quantization) and ``qlora8`` (LoRA on an int8 base), all through bitsandbytes on CPU for the QLoRA ones.

    python bench/bench_train.py                      # bundled+small x lora+full, 1 thread, ~3 minutes
    python bench/bench_train.py --models small --ftypes lora --threads 2 --steps 30
    python bench/bench_train.py --out bench/RESULTS-train.md
    python bench/bench_train.py --models medium --ftypes lora,qlora4,qlora8 --steps 8 --out bench/RESULTS-qlora.md

Other knobs: --no-grad-ckpt, --cutoff-len, --batch-size, --grad-accum.
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


MODEL_SIZES = {
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768),
    "medium": dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=8, intermediate_size=2816),
}
FTYPES = {"lora": ("lora", None), "full": ("full", None), "qlora4": ("lora", 4), "qlora8": ("lora", 8)}


def _model_dir(name: str) -> str:
    """The bundled model, or a randomly initialised (seed 0) Qwen3 of a named size, built once per machine."""
    if name == "bundled":
        return os.path.join(REPO, "examples", "tiny-qwen3")
    path = os.path.join(tempfile.gettempdir(), f"lmf-bench-{name}-qwen3")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        from transformers import AutoTokenizer

        from lmf.testing.tiny import build_tiny_model

        tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "examples", "tiny-qwen3"))
        build_tiny_model(path, arch="qwen3", seed=0, tokenizer=tok, **MODEL_SIZES[name])
    return path


def child(args) -> dict:
    """One measured configuration (runs in its own process)."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from lmf.config.parser import build_config
    from lmf.model.loader import load_model
    from lmf.data.collator import SFTCollator
    from lmf.train.sft import SFTObjective
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer
    from lmf.train.workflow import load_tokenizer_and_data

    model_dir = _model_dir(args.model)
    out = tempfile.mkdtemp(prefix="lmf-bench-train-")
    finetuning_type, bits = FTYPES[args.ftype]
    cfg = build_config(dict(
        model_name_or_path=model_dir, stage="sft", finetuning_type=finetuning_type, quantization_bit=bits,
        template="qwen",
        dataset_dir=os.path.join(REPO, "examples", "data"), dataset="identity,alpaca_en_demo", cutoff_len=args.cutoff_len,
        output_dir=out, overwrite_output_dir=True, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=1e-4 if args.ftype == "full" else 1e-3,
        max_steps=args.warmup + args.steps, save_strategy="no", logging_steps=1, disable_tqdm=True,
        disable_gradient_checkpointing=args.no_grad_ckpt, report_to="none",
    ))
    runtime = setup_runtime(cfg)
    set_seed(0)
    tokenizer, _, data = load_tokenizer_and_data(cfg, "sft")
    model = load_model(cfg, tokenizer, is_trainable=True)
    trainer = Trainer(cfg, model, tokenizer, SFTObjective(cfg, model, SFTCollator(tokenizer)),
                      data.train_dataset, runtime)

    marks: dict = {}
    original_step = trainer.train_step

    def step(*args_, **kwargs):  # timestamps the end of the warm-up steps
        record = original_step(*args_, **kwargs)
        if record.step == args.warmup:
            marks.update(wall=time.perf_counter(), cpu=time.process_time(), tokens=trainer.state.tokens_seen)
        return record

    trainer.train_step = step
    trainer.checkpoints.save_final = lambda run, state: None  # time the loop only
    state = trainer.train()
    wall, cpu = time.perf_counter() - marks["wall"], time.process_time() - marks["cpu"]
    tokens = state.tokens_seen - marks["tokens"]
    losses = [h["loss"] for h in state.log_history]
    return {
        "model": args.model, "ftype": args.ftype, "threads": args.threads, "steps": args.steps,
        "grad_ckpt": not args.no_grad_ckpt, "tokens": tokens,
        "tok_per_s": tokens / wall, "tok_per_cpu_s": tokens / cpu,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": _logical_params(model), "weights_mib": model.get_memory_footprint() / 2**20,
        "loss_first": losses[0], "loss_last": losses[-1],
    }


def _ratios(rows: list[dict]) -> list[str]:
    """QLoRA against LoRA on the same model: peak RSS, weights and tokens/s ratios."""
    out = []
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["ftype"] == "lora"), None)
        if base is None or not r["ftype"].startswith("qlora"):
            continue
        if not out:
            out = ["", "| model | vs lora | peak RSS ratio | weights ratio | tok/s ratio | tok/CPU-s ratio |",
                   "|---|---|---:|---:|---:|---:|"]
        out.append(f"| {r['model']} | {r['ftype']} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | "
                   f"{r['weights_mib'] / base['weights_mib']:.2f}x | {r['tok_per_s'] / base['tok_per_s']:.2f}x | "
                   f"{r['tok_per_cpu_s'] / base['tok_per_cpu_s']:.2f}x |")
    return out


def _logical_params(model) -> int:
    """Parameter count as the unquantized model has it (bitsandbytes packs two 4-bit weights per byte)."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += shape.numel() if shape is not None else p.numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="bundled", help=argparse.SUPPRESS)
    parser.add_argument("--ftype", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="bundled,small")
    parser.add_argument("--ftypes", default="lora,full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--no-grad-ckpt", action="store_true")
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    rows = []
    for model in args.models.split(","):
        for ftype in args.ftypes.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--ftype", ftype,
                   "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--cutoff-len", str(args.cutoff_len), "--batch-size", str(args.batch_size),
                   "--grad-accum", str(args.grad_accum)] + (["--no-grad-ckpt"] if args.no_grad_ckpt else [])
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{model}/{ftype} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(line[len("RESULT "):])
            rows.append(row)
            print(f"{model:8s} {ftype:6s} {row['params']:>11,d} params  {row['weights_mib']:7.0f} MiB weights  "
                  f"{row['tok_per_s']:8.0f} tok/s  "
                  f"{row['tok_per_cpu_s']:8.0f} tok/CPU-s  peak RSS {row['peak_rss_mib']:7.0f} MiB  "
                  f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}", flush=True)

    if args.out:
        lines = [
            "# Training benchmark (CPU)", "",
            f"`python bench/bench_train.py {' '.join(sys.argv[1:])}`", "",
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
            f"identity + alpaca_en_demo, cutoff_len {args.cutoff_len}, micro-batch {args.batch_size} x accumulation "
            f"{args.grad_accum}, gradient checkpointing {'off' if args.no_grad_ckpt else 'on'}; {args.steps} timed steps "
            f"after {args.warmup} warm-up steps. tokens = non-pad input tokens. tok/CPU-s divides by the process CPU "
            "time, which stays meaningful on a loaded machine; peak RSS is ru_maxrss of the whole process.", "",
            "| model | finetuning | params | weights in memory | tok/s (wall) | tok/CPU-s | peak RSS | "
            "loss first -> last |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            lines.append(f"| {r['model']} | {r['ftype']} | {r['params']:,} | {r['weights_mib']:.0f} MiB | "
                         f"{r['tok_per_s']:.0f} | {r['tok_per_cpu_s']:.0f} | {r['peak_rss_mib']:.0f} MiB | "
                         f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
        lines += _ratios(rows)
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
