"""torch_compile against eager, in one run: the same LoRA SFT (a small Qwen3-architecture model built here, the
alpaca demo data, packed rows of a fixed length) trained eagerly and with each decoder block compiled (inductor),
each in its own process, steps timed by the trainer (tokens_per_second); the first steps of the compiled run include
its compilation and are reported apart.

    python bench/bench_compile.py [--steps 12] [--warmup 3] [--out bench/RESULTS-compile.md]

Honesty checks: both sides see the same batches (same seed and data; real tokens per step equal) and their losses
agree (compiled kernels reorder float sums: rel. 1e-3); the compiled run must have logged its compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model: str, out: str, steps: int, extra: list[str]) -> tuple[list[dict], str]:
    args = [f"model_name_or_path={model}", f"output_dir={out}", "dataset_dir=examples/data", "dataset=alpaca_en_demo",
            "template=qwen", "cutoff_len=512", "packing=true", "per_device_train_batch_size=2",
            f"max_steps={steps}", "logging_steps=1", "save_steps=100000", "disable_tqdm=true", "learning_rate=1e-4",
            "finetuning_type=lora", "lora_target=all", f"preprocessing_cache_dir={out}-cache", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "lmf", "sft", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(extra) or 'eager'}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h for h in json.load(fh)["log_history"] if "loss" in h], proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (compilation)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS-compile.md"))
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from transformers import AutoTokenizer

    from lmf.testing.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(os.path.join(tmp, "model"), arch="qwen3", seed=0, hidden_size=256, num_layers=4,
                                 num_heads=4, num_kv_heads=2, intermediate_size=768,
                                 tokenizer=AutoTokenizer.from_pretrained(os.path.join(ROOT, "examples", "tiny-qwen3")))
        eager, _ = _train(model, os.path.join(tmp, "eager"), args.steps, [])
        compiled, log = _train(model, os.path.join(tmp, "compiled"), args.steps,
                               ["torch_compile=true", "torch_compile_backend=inductor"])
    assert "modules (backend inductor)" in log, "the compiled run did not compile"
    assert len(eager) == len(compiled) == args.steps
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(a["loss"]), (a, b)
    tps = {name: statistics.median(h["tokens_per_second"] for h in run[args.warmup:])
           for name, run in (("eager", eager), ("compiled", compiled))}
    lines = [
        "# torch_compile against eager (bench/bench_compile.py)", "",
        f"LoRA SFT of a 4-layer Qwen3 (hidden 256) on packed 512-token rows, micro-batch 2, {args.steps} steps, CPU "
        f"({os.cpu_count()} cores); median tokens/s of steps {args.warmup + 1}-{args.steps}. Losses of every step "
        "agree within rel. 1e-3.", "",
        "| run | tokens/s | vs eager |", "|---|---:|---:|",
        f"| eager | {tps['eager']:.0f} | 1.00 |",
        f"| compiled (inductor) | {tps['compiled']:.0f} | {tps['compiled'] / tps['eager']:.2f} |", "",
        f"Max loss difference: {max(abs(a['loss'] - b['loss']) for a, b in zip(eager, compiled)):.2e}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
