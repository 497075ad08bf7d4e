#!/usr/bin/env python
"""Vision-language SFT, lmf vs LLaMA-Factory 0.9.5 in one run: image preprocessing samples/s, LoRA train tokens/s.

    python bench/bench_vlm.py                      # ~3 minutes on 2 cores
    python bench/bench_vlm.py --copies 40 --steps 0 --out bench/RESULTS-vlm.md

Both sides get the same tiny random-init Qwen2-VL (vision tower of 2 blocks, hidden 128; the local tokenizer),
the same data (LLaMA-Factory's ``mllm_demo``, its 6 conversations about 3 photos copied ``--copies`` times),
template ``qwen2_vl``, ``image_max_pixels`` 262144, cutoff_len 2048, the same LoRA settings, batch, thread count
and worker count. Each side runs in a fresh process (bench/compare_lf_sides); LLaMA-Factory gets the model's image
processor in place of ``AutoProcessor`` (which needs torchvision here), as in bench/lf_vl_golden.py.

Honesty checks, printed in the report: the tokenized datasets are compared (rows, tokens, label tokens, a digest
over every row's ids and labels); train tokens/s counts the non-pad tokens of the data each side trained on (one
epoch of the same records) over the time of its trainer's ``train`` call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from compare_lf import ensure_lf_venv, log, run_side  # noqa: E402

DEMO = os.path.join(REPO, "examples", "data")


def build(work: str, copies: int) -> tuple[str, str]:
    """(model dir, data dir) under ``work``."""
    sys.path.insert(0, os.path.join(REPO, "src"))
    from lmf.testing.tiny_vlm import build_tiny_vlm

    model = os.path.join(work, "tiny-qwen2-vl")
    if not os.path.isdir(model):
        build_tiny_vlm(model, "qwen2_vl", hidden_size=128, num_layers=2, vision_depth=2)
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(DEMO, "mllm_demo.json"), encoding="utf-8") as fh:
        records = json.load(fh)
    with open(os.path.join(data, "mllm_bench.json"), "w", encoding="utf-8") as fh:
        json.dump(records * copies, fh)
    link = os.path.join(data, "mllm_demo_data")
    if not os.path.exists(link):
        os.symlink(os.path.join(DEMO, "mllm_demo_data"), link)
    info = {"mllm_bench": {"file_name": "mllm_bench.json", "formatting": "sharegpt",
                           "columns": {"messages": "messages", "images": "images"},
                           "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                    "assistant_tag": "assistant"}}}
    with open(os.path.join(data, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    return model, data


def config(model: str, data: str, out: str, workers: int, batch: int) -> dict:
    return {"model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "lora_rank": 8, "dataset": "mllm_bench", "dataset_dir": data,
            "template": "qwen2_vl", "cutoff_len": 2048, "image_max_pixels": 262144, "overwrite_cache": True,
            "preprocessing_num_workers": workers, "dataloader_num_workers": 0, "output_dir": out,
            "overwrite_output_dir": True, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
            "learning_rate": 1e-4, "num_train_epochs": 1.0, "lr_scheduler_type": "constant", "logging_steps": 10,
            "save_strategy": "no", "report_to": "none", "seed": 42, "bf16": False, "disable_tqdm": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=20, help="copies of mllm_demo's 6 records")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="preprocessing_num_workers on both sides")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lf-python", default=os.path.join(BENCH, ".lf-venv", "bin", "python"))
    parser.add_argument("--work", default=os.path.join(BENCH, ".cache", "bench_vlm"))
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args()
    ensure_lf_venv(args.lf_python)
    model, data = build(args.work, args.copies)
    results = {}
    for action in ("preprocess", "train"):
        for side, python in (("lmf", sys.executable), ("lf", args.lf_python)):
            out = tempfile.mkdtemp(prefix=f"vlm-{side}-", dir=args.work)
            log(f"{side} {action}")
            results[(side, action)] = run_side(side, python, action, config(model, data, out, args.workers,
                                                                             args.batch),
                                               args.work, f"{side}_{action}", args.threads, vision=True)
            shutil.rmtree(out, ignore_errors=True)
    report = render(results, args)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report)


def render(results: dict, args) -> str:
    pre_lmf, pre_lf = results[("lmf", "preprocess")], results[("lf", "preprocess")]
    tr_lmf, tr_lf = results[("lmf", "train")], results[("lf", "train")]
    rows = pre_lmf["stats"]["rows"]
    same_data = pre_lmf["stats"] == pre_lf["stats"]
    lines = [
        "# Vision-language SFT: lmf vs LLaMA-Factory 0.9.5",
        "",
        f"`python bench/bench_vlm.py --copies {args.copies} --threads {args.threads} --workers {args.workers} "
        f"--batch {args.batch}` on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"Tiny random-init Qwen2-VL (hidden 128, 2 layers, vision tower of 2 blocks), mllm_demo x {args.copies} "
        f"({rows} samples, 3 distinct photos), template qwen2_vl, image_max_pixels 262144, LoRA r8 on all linears "
        "of the language model, CPU.",
        "",
        "| | lmf | LLaMA-Factory | lmf / LF |",
        "|---|---|---|---|",
    ]
    pre_a, pre_b = rows / pre_lmf["seconds"], rows / pre_lf["seconds"]
    lines.append(f"| preprocessing, samples/s | {pre_a:.1f} | {pre_b:.1f} | {pre_a / pre_b:.2f}x |")

    def tps(r):
        return r["data"]["real_tokens"] / r["train_seconds"]

    a, b = tps(tr_lmf), tps(tr_lf)
    lines.append(f"| LoRA SFT, train tokens/s | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    lines.append(f"| peak RSS of the train process, MiB | {tr_lmf['peak_rss_mib']:.0f} | {tr_lf['peak_rss_mib']:.0f} | "
                 f"{tr_lmf['peak_rss_mib'] / tr_lf['peak_rss_mib']:.2f}x |")
    lines += ["", "Honesty checks:", "",
              f"- tokenized data identical on both sides (rows, tokens, label tokens, digest of every row): "
              f"**{'yes' if same_data else 'NO'}** (lmf {pre_lmf['stats']}, LF {pre_lf['stats']})",
              f"- trained on: lmf {tr_lmf['data']['rows']} rows / {tr_lmf['data']['real_tokens']} tokens in "
              f"{tr_lmf['global_step']} steps, LF {tr_lf['data']['rows']} rows / {tr_lf['data']['real_tokens']} tokens in "
              f"{tr_lf['global_step']} steps; loss {tr_lmf['first_loss']:.3f} -> {tr_lmf['last_loss']:.3f} (lmf), "
              f"{tr_lf['first_loss']:.3f} -> {tr_lf['last_loss']:.3f} (LF)",
              f"- parameters of the trained model: lmf {tr_lmf['params']}, LF {tr_lf['params']}",
              "- LLaMA-Factory labels nothing differently here (train_on_prompt is off); lmf never labels vision "
              "tokens, so the data is identical.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
