"""Packed-row training step: per-segment sdpa (lmf.model.packed_attention) vs the block-diagonal mask.

Same setting as ``compare_lf.py``'s CPU train section with packing: LoRA (rank 8, all linear) on the
tiny Qwen3 (hidden 128, 2 layers, 4 heads, 2 kv heads; bench/.cache/compare_lf/models/tiny-qwen3-train,
built when missing), alpaca_en_demo (96 records) packed to cutoff_len 1024, micro-batch 4, gradient
checkpointing on, fp32. One process loads data and model once, then runs interleaved rounds of
forward + backward over every packed batch, alternately with ``packed_sdpa`` off (the mask path)
and ``=1`` (per-segment), and reports non-pad tokens per second of wall time and per CPU-second of
the process (``time.process_time``: robust to other load on a shared machine). It also checks that
both paths give the same loss.

    python bench/bench_packed_attention.py                  # 5 rounds, 1 thread
    python bench/bench_packed_attention.py --cutoff-len 2048 --rounds 3 --threads 2
    python bench/bench_packed_attention.py --device cuda    # on a GPU machine (bf16 off: fp32)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY_TRAIN_SHAPE = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384}


def model_dir() -> str:
    path = os.path.join(HERE, ".cache", "compare_lf", "models", "tiny-qwen3-train")
    if not os.path.isfile(os.path.join(path, "config.json")):
        from lmf.testing.tiny import build_tiny_model

        tmp = path + ".tmp"
        build_tiny_model(tmp, arch="qwen3", seed=0, **TINY_TRAIN_SHAPE)
        os.replace(tmp, path)
    return path


def load(args):
    from lmf.config.parser import build_config
    from lmf.data.collator import SFTCollator
    from lmf.data.loader import get_dataset
    from lmf.data.template import get_template
    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config({
        "model_name_or_path": model_dir(), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_target": "all", "dataset_dir": os.path.join(REPO, "examples", "data"),
        "dataset": "alpaca_en_demo", "template": "qwen", "cutoff_len": args.cutoff_len, "max_samples": args.records,
        "packing": True, "neat_packing": False, "output_dir": tempfile.mkdtemp(prefix="lmf-bench-packed-"),
        "overwrite_cache": True, "use_cpu": args.device == "cpu", "report_to": "none",
    })
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.data.template, tokenizer)
    template.fix_tokenizer(tokenizer)
    rows = list(get_dataset(cfg, tokenizer, template, stage="sft").train_dataset)
    collate = SFTCollator(tokenizer)
    batches = [collate(rows[i:i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    model = load_model(cfg, tokenizer, is_trainable=True).to(args.device)
    model.train()
    return model, batches


def run_epoch(model, batches, device) -> tuple[float, int]:
    import torch

    from lmf.loss import causal_lm_loss
    from lmf.model.forward import decoder_hidden_states, lm_head_of

    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        loss_sum, n = causal_lm_loss(hidden, lm_head_of(model), batch["labels"], chunk_size=1024)
        (loss_sum / n).backward()
        total += float(loss_sum.detach())
        tokens += int(batch["attention_mask"].sum())
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return total, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--records", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    model, batches = load(args)
    from lmf.model.forward import set_packed_sdpa
    from lmf.model.packed_attention import packed_segments

    segs = [packed_segments(b["position_ids"]) for b in batches]
    print(f"{len(batches)} batches of {args.batch_size}x{batches[0]['input_ids'].shape[1]}, "
          f"{sum(s.num_segments for s in segs)} segments (pad tokens count as 1-token segments), "
          f"{statistics.mean(len(s.buckets) for s in segs):.1f} buckets/batch", flush=True)
    results: dict = {"mask": [], "varlen": []}
    losses: dict = {}
    for mode in ("mask", "varlen"):  # warm-up, one of each
        set_packed_sdpa(model, mode == "varlen")
        losses[mode], _ = run_epoch(model, batches, args.device)
    for r in range(args.rounds):
        for mode in (("mask", "varlen") if r % 2 == 0 else ("varlen", "mask")):
            set_packed_sdpa(model, mode == "varlen")
            wall, cpu = time.perf_counter(), time.process_time()
            _, tokens = run_epoch(model, batches, args.device)
            results[mode].append((time.perf_counter() - wall, time.process_time() - cpu, tokens))
            print(f"round {r + 1} {mode:6s}: wall {results[mode][-1][0]:.2f} s, cpu {results[mode][-1][1]:.2f} s",
                  flush=True)
    print(f"loss sum: mask {losses['mask']:.6f}, varlen {losses['varlen']:.6f} "
          f"(rel diff {abs(losses['mask'] - losses['varlen']) / abs(losses['mask']):.1e})")
    summary = {}
    for mode, runs in results.items():
        tokens = runs[0][2]
        summary[mode] = (tokens / min(w for w, _, _ in runs), tokens / statistics.median(c for _, c, _ in runs))
        print(f"{mode:6s}: best {summary[mode][0]:.0f} tok/s wall, median {summary[mode][1]:.0f} tok per CPU-s")
    print(f"varlen / mask: {summary['varlen'][0] / summary['mask'][0]:.2f}x wall (best), "
          f"{summary['varlen'][1] / summary['mask'][1]:.2f}x CPU (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
