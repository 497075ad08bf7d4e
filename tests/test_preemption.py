"""SIGTERM / SIGINT during training: finish the step, save a checkpoint, exit 143 / 130; a relaunch resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import build_once
from test_e2e_sft import DEMO, REPO_ROOT, run_lmf

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

BASE = ("max_steps=6", "max_samples=16", "save_steps=100", "logging_steps=1", "preprocessing_num_workers=1",
        "lora_dropout=0.1")


def state(out) -> dict:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)


def checkpoints(out) -> list[str]:
    return sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))


def history_losses(out) -> list[float]:
    return [h["loss"] for h in state(out)["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    def build(folder):
        proc = run_lmf("sft", DEMO, f"output_dir={folder / 'ref'}", *BASE)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return build_once(tmp_path_factory, "preemption-uninterrupted", build) / "ref"


@pytest.mark.parametrize("sig,code", [("TERM", 143), ("INT", 130)])
def test_signal_saves_a_checkpoint_and_the_relaunch_resumes_exactly(uninterrupted, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = run_lmf("sft", DEMO, f"output_dir={out}", *BASE,
                   env_extra={"LMF_TEST_SIGNAL_AT_STEP": "2", "LMF_TEST_SIGNAL": sig})
    assert proc.returncode == code, proc.stderr[-3000:]
    assert f"interrupted by SIG{sig} after step 3" in proc.stderr and "Traceback" not in proc.stderr
    # the signal landed after step 2: step 3 was finished, then checkpoint-3 written; nothing looks finished
    assert checkpoints(out) == ["checkpoint-3"]
    assert state(out / "checkpoint-3")["global_step"] == 3
    assert not (out / "trainer_state.json").exists() and not (out / "adapter_model.safetensors").exists()
    again = run_lmf("sft", DEMO, f"output_dir={out}", *BASE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    assert history_losses(out) == history_losses(uninterrupted)
    assert (out / "adapter_model.safetensors").read_bytes() == (uninterrupted / "adapter_model.safetensors").read_bytes()


def _launch(out, env_extra: dict) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env_extra)
    proc = subprocess.Popen([sys.executable, "-c", "from lmf.launcher import launch; launch()", "sft", DEMO,
                             f"output_dir={out}", *BASE, "max_steps=40"], cwd=REPO_ROOT, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    return proc, lines, reader


def _signal_after_first_step(proc, lines, sig=signal.SIGTERM, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while not any("step=1 " in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)


def test_outside_sigterm_stops_after_the_current_step(tmp_path):
    out = tmp_path / "run"
    proc, lines, reader = _launch(out, {"LMF_TEST_STEP_SLEEP_S": "0.3"})
    _signal_after_first_step(proc, lines)
    assert proc.wait(timeout=120) == 143
    reader.join(timeout=10)
    (ck,) = checkpoints(out)
    step = state(out / ck)["global_step"]
    assert 1 <= step < 40 and ck == f"checkpoint-{step}"


@pytest.mark.slow
def test_torchrun_ranks_agree_on_the_step_when_one_rank_is_signalled(tmp_path):
    """Only rank 1 gets SIGTERM (after step 2); both ranks stop after step 3, the launcher exits 143, and the
    relaunch ends with the same loss history as an uninterrupted 2-process run."""
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    ref = tmp_path / "ref"
    proc = run_lmf("sft", DEMO, f"output_dir={ref}", *BASE, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    proc = run_lmf("sft", DEMO, f"output_dir={out}", *BASE,
                   env_extra=dict(env, LMF_TEST_SIGNAL_AT_STEP="2", LMF_TEST_KILL_RANK="1"))
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert "rank 1 received SIGTERM" in proc.stderr and "rank 0 received" not in proc.stderr
    assert checkpoints(out) == ["checkpoint-3"]
    assert sorted(p for p in os.listdir(out / "checkpoint-3") if p.startswith("rng_state")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]
    again = run_lmf("sft", DEMO, f"output_dir={out}", *BASE, env_extra=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert history_losses(out) == history_losses(ref)


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_the_torchrun_workers(tmp_path):
    out = tmp_path / "run"
    proc, lines, reader = _launch(out, {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "LMF_TEST_STEP_SLEEP_S": "0.3"})
    _signal_after_first_step(proc, lines)
    assert proc.wait(timeout=180) == 143, "".join(lines)[-4000:]
    reader.join(timeout=10)
    text = "".join(lines)
    assert "rank 0 received SIGTERM" in text and "rank 1 received SIGTERM" in text
    (ck,) = checkpoints(out)
    assert state(out / ck)["global_step"] >= 1
    # the preemption is reported once, in one line, with no torchrun SignalException traceback under it
    assert "Traceback" not in text and "SignalException" not in text, text[-4000:]
    [report] = [line for line in lines if "training interrupted by SIGTERM" in line]
    assert report.startswith("lmf: ") and f"checkpoint saved at {out / ck}" in report, report
