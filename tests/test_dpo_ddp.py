"""DPO and RM under torchrun with 2 CPU processes (gloo): same trajectory as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lmf.experiment import run_experiment

from test_dpo_train import history, pref_argv, train_entries, write_toy_preference_data  # noqa: E402

pytestmark = pytest.mark.slow


def _torchrun(command: str, argv: list[str], cwd) -> subprocess.CompletedProcess:
    """``lmf <command> cfg.yaml`` relaunched through torchrun with 2 processes."""
    cfg = {}
    for item in argv:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    path = os.path.join(cwd, "cfg.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lmf", command, path], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=480)


@pytest.mark.parametrize("stage,ftype,fsdp,metric", [
    ("dpo", "lora", None, "rewards/margins"),
    ("dpo", "full", "full_shard", "rewards/margins"),  # policy and frozen reference both sharded
    ("rm", "full", None, "scores/margins"),
])
def test_two_processes_match_one_process(tiny_model_dir, tmp_path, stage, ftype, fsdp, metric):
    data = write_toy_preference_data(tmp_path / "data")
    kw = dict(stage=stage, finetuning_type=ftype, max_steps=3, save_steps=2, cutoff_len=128,
              learning_rate=5e-3 if ftype == "lora" else 5e-4)
    if fsdp:
        kw["fsdp"] = fsdp
    if stage == "rm":  # 7 eval pairs: uneven across 2 ranks, each must be counted once
        kw.update(val_size=7, eval_strategy="steps", eval_steps=3)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    # one process, 4 pairs per micro-batch == two processes, 2 pairs each (the sampler deals rank r every 2nd pair)
    run_experiment(pref_argv(tiny_model_dir, data, single, per_device_train_batch_size=4, **kw), stage)
    proc = _torchrun(stage, pref_argv(tiny_model_dir, data, multi, per_device_train_batch_size=2, **kw), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"parallel={'fsdp' if fsdp else 'ddp'}" in proc.stderr
    if fsdp and stage == "dpo":
        assert "reference model sharded with FSDP2 across 2 ranks" in proc.stderr
    a, b = train_entries(single), train_entries(multi)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-5)
        assert y[metric] == pytest.approx(x[metric], rel=1e-3, abs=1e-5)
    if stage == "rm":
        ea = [h for h in history(single) if "eval_loss" in h]
        eb = [h for h in history(multi) if "eval_loss" in h]
        assert len(ea) == len(eb) >= 1
        for x, y in zip(ea, eb):
            assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-3, abs=1e-5)
            assert y["eval_accuracy"] == pytest.approx(x["eval_accuracy"], abs=1e-6)
    state = json.load(open(os.path.join(multi, "trainer_state.json")))
    assert state["finished"] and state["world_size"] == 2
    assert os.path.isdir(os.path.join(multi, "checkpoint-2"))
    if stage == "rm":
        assert os.path.isfile(os.path.join(multi, "value_head.safetensors"))


def test_precomputed_reference_with_a_sharded_reference_and_an_odd_pair_count(tiny_model_dir, tmp_path):
    """Ranks score different numbers of pairs; a sharded reference must still run in step (no hang)."""
    data = write_toy_preference_data(tmp_path / "data")
    kw = dict(finetuning_type="full", fsdp="full_shard", max_steps=2, cutoff_len=128, learning_rate=5e-4,
              precompute_ref_log_probs=True, per_device_eval_batch_size=2, max_samples=5)
    out = str(tmp_path / "out")
    proc = _torchrun("dpo", pref_argv(tiny_model_dir, data, out, per_device_train_batch_size=2, **kw), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precomputed reference log-probs for 5 pairs" in proc.stderr
    assert len(train_entries(out)) == 2
