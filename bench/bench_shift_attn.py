"""shift_attn (S²-Attn) against full causal attention: one attention call's forward + backward time and the peak
memory it allocates, at growing row lengths, on whatever device is there (CPU here).

Honesty checks: both sides get the same tensors; the full side is torch's causal sdpa (its fused kernel, no mask); the
S²-Attn side is lmf's own function (lmf.model.shift_attention.grouped_attention), checked against dense attention under
its group masks before timing; each side is warmed up, then the median of ``--repeats`` runs is reported.

    python bench/bench_shift_attn.py [--lengths 2048 8192 16384] [--out bench/RESULTS-shift-attn.md]
"""

from __future__ import annotations

import argparse
import statistics
import time


def _check(device) -> None:
    import torch
    import torch.nn.functional as F

    from lmf.model.shift_attention import group_size, grouped_attention

    q, k, v = (torch.randn(1, 4, 64, 8, dtype=torch.float64, device=device) for _ in range(3))
    g, pos = group_size(64), torch.arange(64, device=device)
    causal = pos[:, None] >= pos[None, :]
    groups = [pos // g, (pos + g // 2) // g]
    allowed = torch.stack([causal & (groups[h >= 2][:, None] == groups[h >= 2][None, :]) for h in range(4)])[None]
    torch.testing.assert_close(grouped_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))


def _measure(fn, q, k, v, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
        start = time.perf_counter()
        fn(qs, ks, vs).sum().backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_mb(fn, q, k, v) -> float:
    """Peak memory the call allocates (CUDA's allocator stats; on CPU, torch's profiler memory events)."""
    import torch

    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    if q.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(qs, ks, vs).sum().backward()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(qs, ks, vs).sum().backward()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def main(argv=None) -> None:
    import torch
    import torch.nn.functional as F

    from lmf.model.shift_attention import grouped_attention

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _check(device)
    full = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    rows = []
    for length in args.lengths:
        gen = torch.Generator(device=device).manual_seed(length)
        q, k, v = (torch.randn(1, args.heads, length, args.head_dim, dtype=dtype, device=device, generator=gen)
                   for _ in range(3))
        t_full, t_s2 = _measure(full, q, k, v, args.repeats), _measure(grouped_attention, q, k, v, args.repeats)
        m_full, m_s2 = _peak_mb(full, q, k, v), _peak_mb(grouped_attention, q, k, v)
        rows.append((length, t_full, t_s2, m_full, m_s2))
        print(f"L={length}: full {t_full * 1e3:.1f} ms, S2 {t_s2 * 1e3:.1f} ms ({t_full / t_s2:.2f}x); "
              f"peak {m_full:.0f} MiB vs {m_s2:.0f} MiB", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        "# shift_attn (S²-Attn) against full causal attention (bench/bench_shift_attn.py)", "",
        f"One attention call, forward + backward, batch 1, {args.heads} heads of {args.head_dim}, {dtype}, {name}; "
        f"median of {args.repeats} runs after a warm-up. Full: torch's causal sdpa (fused, no mask). S²-Attn: "
        "lmf.model.shift_attention.grouped_attention (groups of L/4, half of the heads shifted), checked against "
        "dense attention under its masks first. Peak: memory the call allocates.", "",
        "| L | full ms | S²-Attn ms | speed-up | full peak MiB | S²-Attn peak MiB |", "|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x | {c:.0f} | {d:.0f} |" for n, a, b, c, d in rows],
    ]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
