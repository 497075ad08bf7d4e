"""Multi-process training on CPU through the real launcher: FORCE_TORCHRUN=1 NPROC_PER_NODE=2 (gloo).

The 2-process runs (per-device micro-batch 4, accumulation 2) see, at every step, exactly the
samples that a 1-process run with accumulation 4 sees, and the loss is averaged over all label
tokens of the step, so the loss curves must agree (up to float summation order).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from test_e2e_sft import DEMO, history, run_lmf

pytestmark = pytest.mark.slow

COMMON = ("max_samples=20", "max_steps=4", "save_steps=2", "logging_steps=1", "disable_tqdm=true")
TWO_PROCS = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}


def _losses(out) -> list[float]:
    return [h["loss"] for h in history(out)]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ddp_and_fsdp_lora_two_processes_match_one_process(tmp_path):
    import torch

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    p1 = run_lmf("sft", DEMO, f"output_dir={single}", "gradient_accumulation_steps=4", *COMMON)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = run_lmf("sft", DEMO, f"output_dir={ddp}", "gradient_accumulation_steps=2", *COMMON, env_extra=TWO_PROCS)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "launching 2 process(es)" in p2.stderr and "parallel=ddp" in p2.stderr
    assert _losses(ddp) == pytest.approx(_losses(single), rel=1e-4)
    # one output (rank 0 writes), with both ranks' RNG states in the checkpoints
    assert sorted(os.listdir(ddp)) == sorted(os.listdir(single))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(ddp / "checkpoint-4"))
    a, b = _weights(single / "adapter_model.safetensors"), _weights(ddp / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # the same LoRA run sharded with FSDP2: same curve, same adapter (gathered from the shards by rank 0)
    fsdp = tmp_path / "fsdp"
    p3 = run_lmf("sft", DEMO, f"output_dir={fsdp}", "gradient_accumulation_steps=2", "fsdp=full_shard", *COMMON,
                 env_extra=TWO_PROCS)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "parallel=fsdp" in p3.stderr
    assert _losses(fsdp) == pytest.approx(_losses(single), rel=1e-4)
    c = _weights(fsdp / "adapter_model.safetensors")
    assert c.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


def test_fsdp2_from_deepspeed_config_full_finetune_and_exact_resume(tmp_path):
    import torch

    ds = tmp_path / "ds_z3_config.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    args = ("finetuning_type=full", "learning_rate=1e-3", f"deepspeed={ds}", "gradient_accumulation_steps=2", *COMMON)
    single, fsdp, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    p1 = run_lmf("sft", DEMO, f"output_dir={single}", "finetuning_type=full", "learning_rate=1e-3",
                 "gradient_accumulation_steps=4", *COMMON)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = run_lmf("sft", DEMO, f"output_dir={fsdp}", *args, env_extra=TWO_PROCS)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "ZeRO-3 -> FSDP2" in p2.stderr and "parallel=fsdp" in p2.stderr
    assert _losses(fsdp) == pytest.approx(_losses(single), rel=1e-4)
    # relaunch after a "crash" that left only checkpoint-2: resumes automatically and ends bit-identical
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    p3 = run_lmf("sft", DEMO, f"output_dir={resumed}", *args, env_extra=TWO_PROCS)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "resuming from" in p3.stderr
    assert _losses(resumed) == _losses(fsdp)
    a, b = _weights(fsdp / "model.safetensors"), _weights(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(fsdp))  # a loadable full model
