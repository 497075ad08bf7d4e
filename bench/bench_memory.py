"""Peak memory and speed of one training step, chunked vs plain loss, full Qwen3 vocabulary (151,936).

A tiny-depth Qwen3 (random weights; 2 layers, hidden 256 by default) with the real vocabulary: at long
context the logits, not the weights, dominate memory. Each (path, cutoff_len) runs in a fresh
subprocess, one after the other: one forward + backward on one sequence of ``cutoff_len`` tokens,
all of them labelled (the worst case for the chunked path, which skips masked prompt tokens; use
``--prompt-frac 0.5`` for SFT-like batches). Peak memory is the child's peak RSS during the step on
CPU (``VmHWM``, reset just before the step) and ``torch.cuda.max_memory_allocated`` on GPU — both
include the model weights and gradients. tokens/s is the median over ``--steps`` steps after the
measured one. The longest cutoff_len fitting ``--budget-gb`` is predicted from a linear fit of the
measured peaks (memory is linear in the length for both paths) and then verified by a run.

CPU (default: about 5 minutes, one thread, peak < 9 GiB; the plain path is skipped above 4096
tokens because its 8192-token step needs ~15 GiB; speed is measured in process CPU time):

    python bench/bench_memory.py

GPU (H100; bf16 weights; no plain-path length limit, 8 GiB budget; writes bench/RESULTS-memory.md):

    python bench/bench_memory.py --device cuda --lengths 1024,4096,8192,16384 --paths plain,chunked,liger --hidden 512

Other knobs: --paths plain,chunked,liger (liger: needs CUDA and liger-kernel) --layers 2 --hidden 256
--chunk-size 1024 --lora (LoRA on the
attention projections, frozen head) --grad-ckpt (per-layer activation checkpointing) --offload
(with --grad-ckpt on CUDA) --no-budget --out FILE --append.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VOCAB = 151936
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- child: one measured configuration


def _read_status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_ok: bool, rss_before: int) -> int:
    if reset_ok:
        return _read_status_kb("VmHWM")
    import resource  # fallback: lifetime peak of this process (an upper bound)

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_before)


def build_model(args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(2, args.hidden // 64)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=64 if args.hidden >= 128 else args.hidden // heads, max_position_embeddings=max(args.length, 4096),
        tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    if args.grad_ckpt:
        from lmf.model.checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, offload_to_cpu=args.offload, use_reentrant=False)
    return model


def run_child(args) -> dict:
    import torch

    from lmf.loss import IGNORE_INDEX, causal_lm_loss
    from lmf.model.forward import decoder_hidden_states, lm_head_of

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, device, dtype)
    head = lm_head_of(model)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (1, args.length), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, : int(args.length * args.prompt_frac)] = IGNORE_INDEX
    chunk_size = None if args.path == "plain" else args.chunk_size
    use_liger = args.path == "liger"  # liger-kernel's fused linear CE (CUDA; falls back to chunked)

    def step():
        model.zero_grad(set_to_none=True)
        hidden = decoder_hidden_states(model, input_ids)
        loss_sum, count = causal_lm_loss(hidden, head, labels, chunk_size, use_liger=use_liger)
        loss = loss_sum / count
        loss.backward()
        return loss.item()

    # CPU: process time (the machine may be shared; with one thread it equals the uncontended wall time)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = clock()
        loss = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        base = torch.cuda.memory_allocated()
    else:
        rss_before = _read_status_kb("VmRSS")
        reset_ok = _reset_peak_rss()
        loss = step()
        peak = _peak_rss_bytes(reset_ok, rss_before)
        base = rss_before
    times = [clock() - start] if args.steps == 0 else []  # steps 0: time the measured step
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    seconds = statistics.median(times)
    return {"path": args.path, "length": args.length, "peak_bytes": peak, "before_bytes": base, "loss": loss,
            "step_s": seconds, "tokens_per_s": args.length / seconds}


# ---------------------------------------------------------------- parent: orchestration and report


def measure(args, path: str, length: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--path", path, "--length", str(length),
           "--device", args.device, "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--chunk-size", str(args.chunk_size), "--steps", str(args.steps), "--threads", str(args.threads),
           "--prompt-frac", str(args.prompt_frac)]
    for flag in ("lora", "grad_ckpt", "offload"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", LMF_LOG_LEVEL="WARNING")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    else:
        oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
        result = {"path": path, "length": length, "error": "OOM" if oom else proc.stderr.strip().splitlines()[-1:]}
    gib = result.get("peak_bytes", 0) / 2**30
    before = result.get("before_bytes", 0) / 2**30
    print(f"  {path:8s} {length:6d} tokens: " + (f"peak {gib:6.2f} GiB (before step {before:.2f}), "
                                                 f"{result['tokens_per_s']:8.0f} tok/s, loss {result['loss']:.4f}"
          if "error" not in result else f"failed: {result['error']}"), flush=True)
    return result


def fit_longest(points: list[tuple[int, float]], budget: float, multiple: int = 256) -> int | None:
    """Largest length (a multiple of ``multiple``) whose peak, on the least-squares line, fits ``budget``."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return None
    length = int((budget - (my - slope * mx)) / slope) // multiple * multiple
    return length if length > 0 else None


def longest_within_budget(args, path: str, results: list[dict], max_runs: int = 4) -> dict | None:
    """Longest cutoff_len (multiple of 256) whose measured peak fits the budget.

    Each guess is the secant through the two measurements whose peaks are closest to the budget
    (memory is nearly linear in the length), bisection once a fitting and a failing length
    bracket it; every guess is verified by a run.
    """
    budget = args.budget_gb * 2**30
    points = [(r["length"], r["peak_bytes"]) for r in results if r["path"] == path and "error" not in r]
    fits = [x for x, y in points if y <= budget]
    over = [x for x, y in points if y > budget] + [r["length"] for r in results if r["path"] == path and "error" in r]
    best, limit = (max(fits) if fits else None), (min(over) if over else None)
    for _ in range(max_runs):
        closest = sorted(points, key=lambda p: abs(p[1] - budget))[:2]
        guess = fit_longest(closest, budget * 0.99)
        if guess is None or (best is not None and guess <= best):
            break  # the fit says nothing longer than the best verified length fits
        if limit is not None and guess >= limit:
            guess = ((best or 0) + limit) // 2 // 256 * 256  # bisect between fitting and failing
            if guess <= (best or 0):
                break
        if args.max_budget_len and guess > args.max_budget_len:
            return {"path": path, "length": guess, "verified": False,
                    "note": f"predicted; > --max-budget-len {args.max_budget_len}"}
        result = measure(args, path, guess)
        if "error" in result:
            limit = guess
            continue
        points.append((guess, result["peak_bytes"]))
        if result["peak_bytes"] <= budget:
            best = guess
        else:
            limit = guess
    if best is None:
        return None
    peak = max(y for x, y in points if x == best)
    return {"path": path, "length": best, "verified": True, "peak_bytes": peak,
            "note": f"{limit} tokens measured over budget" if limit else ""}


def render(args, results: list[dict], longest: dict) -> str:
    device = args.device
    if device == "cuda":
        import torch

        device = f"cuda ({torch.cuda.get_device_name(0)}, bf16)"
    else:
        device = f"cpu (fp32, {args.threads} thread(s))"
    lines = [
        "# Memory benchmark: chunked vs plain loss",
        "",
        f"`python bench/bench_memory.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"Qwen3 with the full 151,936-token vocabulary, {args.layers} layer(s), hidden {args.hidden}, "
        f"{'LoRA r=16 (frozen head)' if args.lora else 'full fine-tuning (head trained)'}"
        f"{', activation checkpointing' if args.grad_ckpt else ''}{' + CPU offload' if args.offload else ''}; "
        f"device {device}; one sequence of cutoff_len tokens, {100 * (1 - args.prompt_frac):.0f}% of them labelled; "
        f"chunk_size {args.chunk_size}. Peak = "
        f"{'peak RSS of the step (VmHWM)' if args.device == 'cpu' else 'torch.cuda.max_memory_allocated'}, "
        "weights and gradients included. tokens/s = "
        + ("tokens per CPU-second of the process (robust to other load on a shared machine); "
           if args.device == "cpu" else "")
        + ("the measured step's." if args.steps == 0 else f"median of {args.steps} steps after the measured one."),
        "",
    ]
    others = [p for p in args.paths if p != "plain"]
    header = "| cutoff_len | plain peak | plain tok/s |"
    for p in others:
        header += f" {p} peak | {p} tok/s | memory ratio (plain/{p}) | speed ratio ({p}/plain) |"
    lines += [header, "|" + "---:|" * (3 + 4 * len(others))]
    by_key = {(r["path"], r["length"]): r for r in results}

    def peak(r):
        if r is None:
            return "skipped"
        return str(r["error"]) if "error" in r else f"{r['peak_bytes'] / 2**30:.2f} GiB"

    def tps(r):
        return f"{r['tokens_per_s']:.0f}" if r and "error" not in r else "-"

    for length in args.lengths:
        plain = by_key.get(("plain", length))
        row = f"| {length} | {peak(plain)} | {tps(plain)} |"
        for p in others:
            other = by_key.get((p, length))
            ok = plain and other and "error" not in plain and "error" not in other
            mem_ratio = f"{plain['peak_bytes'] / other['peak_bytes']:.2f}x" if ok else "-"
            speed_ratio = f"{other['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if ok else "-"
            row += f" {peak(other)} | {tps(other)} | {mem_ratio} | {speed_ratio} |"
        lines.append(row)
    if longest:
        lines += ["", f"Longest cutoff_len within a {args.budget_gb:g} GiB budget "
                  "(secant/bisection on measured peaks, each guess verified by a run):", ""]
        for path in args.paths:
            item = longest.get(path)
            if item is None:
                lines.append(f"- {path}: not determined")
            elif item.get("verified"):
                extra = f"; {item['note']}" if item.get("note") else ""
                peak_gib = item["peak_bytes"] / 2**30
                lines.append(f"- {path}: {item['length']} tokens (measured peak {peak_gib:.2f} GiB{extra})")
            else:
                lines.append(f"- {path}: ~{item['length']} tokens ({item['note']})")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--lengths", default="1024,4096,8192", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--paths", default="plain,chunked", type=lambda s: s.split(","))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps after the measured one (cpu 0 = time the measured step, cuda 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-frac", type=float, default=0.0, help="fraction of each sequence masked as prompt")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--max-plain-len", type=int, default=None,
                        help="skip the plain path above this length (cpu default 4096, 0 = no limit)")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="memory budget for the longest-cutoff search (cpu 3, cuda 8)")
    parser.add_argument("--max-budget-len", type=int, default=None,
                        help="do not verify predicted lengths above this (cpu 16384, cuda 524288; 0 = no limit)")
    parser.add_argument("--no-budget", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS-memory.md"))
    parser.add_argument("--append", action="store_true", help="append the report to --out instead of replacing it")
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if args.steps is None:
        args.steps = 0 if cpu else 5
    if args.max_plain_len is None:
        args.max_plain_len = 4096 if cpu else 0
    if args.budget_gb is None:
        args.budget_gb = 3.0 if cpu else 8.0
    if args.max_budget_len is None:
        args.max_budget_len = 16384 if cpu else 524288
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return
    results = []
    for length in args.lengths:
        for path in args.paths:
            if path == "plain" and args.max_plain_len and length > args.max_plain_len:
                print(f"  plain    {length:6d} tokens: skipped (--max-plain-len {args.max_plain_len})")
                continue
            results.append(measure(args, path, length))
    longest = {}
    if not args.no_budget:
        for path in args.paths:
            longest[path] = longest_within_budget(args, path, results)
    report = render(args, results, longest)
    print("\n" + report)
    if args.append and os.path.isfile(args.out):
        with open(args.out) as fh:
            report = fh.read() + "\n" + report
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(report)
    os.replace(tmp, args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
