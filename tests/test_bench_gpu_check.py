"""bench/gpu_check.py, the prepared GPU run: its FLOP count, rates, loss agreement and report, and (slow) its
phases end to end on CPU in smoke mode, lmf side only (LLaMA-Factory is not installed in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("mode", ["gpu", "smoke"])
def test_matmul_params_are_the_models_linear_weights(mode):
    """The FLOP count's N is exactly the weights of every nn.Linear of the real Qwen3 model (LM head included)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = gpu_check.SHAPES[mode]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu_check.matmul_params(shape) == linear
    total = sum(p.numel() for p in model.parameters())  # tied: the head is the embedding, counted once
    assert 0 < total - linear < 0.001 * total  # what is left are the norms' weights
    if mode == "gpu":
        assert 490e6 < total < 500e6


def test_step_flops_full_lora_and_attention():
    shape = gpu_check.SHAPES["gpu"]
    n = gpu_check.matmul_params(shape)
    attn = 2.0 * 24 * 14 * 64 * 2048 ** 2  # one causal sequence of 2048 tokens, forward
    assert gpu_check.step_flops(shape, [2048], "full") == pytest.approx(6 * n * 2048 + 3 * attn)
    assert gpu_check.step_flops(shape, [2048], "lora", adapter_params=1000) == pytest.approx(
        4 * n * 2048 + 6 * 1000 * 2048 + 3 * attn)
    # four sequences of 2048 cost less attention than one of 8192 with the same tokens
    four, one = gpu_check.step_flops(shape, [2048] * 4, "full"), gpu_check.step_flops(shape, [8192], "full")
    assert one - four == pytest.approx(3 * 2.0 * 24 * 14 * 64 * (8192 ** 2 - 4 * 2048 ** 2))


def test_steady_rate_leaves_out_the_warmup_steps():
    times = [5.0, 6.0, 6.5, 7.0, 7.5]  # the first step carries the start-up
    assert gpu_check.steady_rate(times, warmup=1) == pytest.approx(4 / 2.5)
    assert gpu_check.steady_rate(times, warmup=2) == pytest.approx(3 / 1.5)
    assert gpu_check.steady_rate(times[:1], warmup=1) is None


def test_loss_agreement():
    same = gpu_check.loss_agreement([12.0, 11.0, 10.0], [12.0, 11.05, 10.1])
    assert same["agree"] and same["first_rel"] == 0 and same["max_rel_step"] == 3
    off = gpu_check.loss_agreement([12.0, 11.0], [12.0, 10.0])
    assert not off["agree"] and off["max_rel"] == pytest.approx(0.1)
    assert not gpu_check.loss_agreement([12.0], [12.0, 11.0])["agree"]  # a side ran fewer steps
    assert gpu_check.loss_agreement([], [1.0])["steps"] == 0


def test_report_renders_partial_results_and_writes_atomically(tmp_path):
    args = type("A", (), {"smoke": False})()
    report = gpu_check.Report(str(tmp_path), args, "bash bench/gpu_check.sh")
    report.data["environment"] = {"gpu": "NVIDIA H200, 143771 MiB", "host": "x86_64", "versions": "torch 2.11"}
    report.data["phases"]["tests"] = {"status": "failed", "counts": {"passed": 5, "failed": 1, "errors": 0, "skipped": 1},
                                      "failures": [{"name": "test_x::test_y", "message": "boom"}], "skips": [],
                                      "files": ["test_x.py"], "seconds": 40, "cap_s": 90}
    report.data["phases"]["model"] = {"status": "ok", "seconds": 20, "cap_s": 45}
    lmf = {"tokens_per_s": 50000.0, "mfu": 0.47, "cuda_peak_mib": 9000.0, "first_loss": 11.93}
    lf = {"tokens_per_s": 30000.0, "mfu": 0.28, "cuda_peak_mib": 20000.0, "first_loss": 11.93}
    report.data["phases"]["sft"] = {"status": "cut at cap", "steps": 20, "warmup": 5, "variants": {
        "full, cutoff 8192": {"lmf": lmf, "lf": lf, "speedup": 5 / 3, "speed_ok": True, "memory_ratio": 0.45,
                              "memory_ok": True, "loss_agreement": {"max_rel": 0.004, "agree": True}, "problems": []},
        "lora, cutoff 8192": {"lmf": {"error": "not run: the phase's time cap was reached"}, "problems": []}}}
    report.save()
    text = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "NVIDIA H200" in text and "5 passed, 1 failed" in text and "`test_x::test_y`: boom" in text
    assert "| full, cutoff 8192 | 50000 | 30000 | 1.67x met | 47.0% | 28.0% | 9000 MiB | 20000 MiB | 0.45x met" in text
    assert "MFU of lmf's full SFT at 8192: 47.0% (target >= 45%: met)" in text
    assert "lora, cutoff 8192, lmf: ...not run: the phase's time cap was reached" in text
    assert json.loads((tmp_path / "gpu-check.json").read_text())["phases"]["sft"]["status"] == "cut at cap"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_without_cuda_and_without_smoke_it_measures_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc = gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--phases", "sft"])
    assert rc == 2
    assert "no CUDA device" in (tmp_path / "out" / "RESULTS-gpu.md").read_text()


@pytest.mark.slow
@pytest.mark.single_process  # gpu_check runs its phases one subprocess after another
def test_smoke_run_lmf_side_end_to_end(tmp_path):
    """Every phase on CPU with tiny shapes (real Qwen vocabulary), lmf only: the tests phase collects the gpu tests,
    the SFT runs clock their steps and keep their losses, the probe records each length, the report is written."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO_ROOT, "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench", "gpu_check.py"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--lf-python", "none", "--steps", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu-check.json").read_text())
    phases = data["phases"]
    assert [phases[p]["status"] for p in gpu_check.PHASES] == ["ok"] * 4
    assert phases["tests"]["counts"]["skipped"] >= 10 and phases["tests"]["counts"]["failed"] == 0
    for label, v in phases["sft"]["variants"].items():
        r = v["lmf"]
        assert len(r["losses"]) == 3 and len(r["step_times"]) == 3 and r["tokens_per_s"] > 0, (label, r)
        assert r["data"]["real_tokens"] == v["cutoff_len"] * v["batch"] * 3 and not v["problems"]
        assert 11.0 < r["first_loss"] < 12.5  # ln(151,936) = 11.93: a random-init model on the real vocabulary
    lengths = phases["probe"]["sides"]["lmf"]["lengths"]
    assert sorted(lengths) == ["256", "512"] and all(x["fits"] for x in lengths.values())
    assert lengths["512"]["real_tokens"] == 1024
    text = (out / "RESULTS-gpu.md").read_text()
    assert "**Smoke run**" in text and "| lora, cutoff 256 |" in text and (out / "pytest-gpu.log").exists()
