"""CUDA-only end-to-end runs of `lmf sft` (skipped on CPU; run by bench/gpu_check.sh on the GPU machine).

Each test trains the bundled tiny model for a few steps on the GPU through the CLI and checks what the feature
is for: bf16 autocast and fused AdamW train (the loss falls), the adapter reloads on CUDA, packed attention on
CUDA gives the loss of the unpacked rows, offloaded activations train, torchrun's single-process NCCL group
forms, QLoRA trains in 4 bits where bitsandbytes is installed.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_e2e_sft import DEMO, REPO_ROOT, history, run_lmf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")


def train(tmp_path, name: str, *overrides: str, env_extra: dict | None = None, steps: int = 12):
    out = tmp_path / name
    proc = run_lmf("sft", DEMO, f"output_dir={out}", f"max_steps={steps}", "max_samples=96", "logging_steps=1",
                   "save_steps=1000", "bf16=true", "plot_loss=false", *overrides, env_extra=env_extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "device=cuda" in proc.stderr and "autocast bfloat16" in proc.stderr, proc.stderr[-2000:]
    return out, proc.stderr, [h["loss"] for h in history(out) if "loss" in h]


def test_lora_bf16_trains_and_adapter_reloads_on_cuda(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, losses = train(tmp_path, "lora")
    assert len(losses) == 12 and all(x == x for x in losses), losses  # no NaN under bf16 autocast
    assert min(losses[-3:]) < losses[0] - 0.3, losses
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), str(out)).cuda().eval()
    with torch.no_grad():
        ids = model.generate(input_ids=torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=4, do_sample=False)
    assert ids.shape[1] == 7


def test_full_bf16_with_fused_adamw(tmp_path):
    _, log, losses = train(tmp_path, "full", "finetuning_type=full", "learning_rate=1e-4", "optim=adamw_torch_fused")
    assert min(losses[-3:]) < losses[0] - 0.3, losses
    assert "Traceback" not in log


def test_packed_attention_on_cuda_matches_unpacked_loss(tmp_path):
    """neat_packing keeps each document's attention to itself: one step over the same 16 documents, packed into
    a few rows or one per row, at learning rate 0, gives the same loss within bf16 noise."""
    keys = ("learning_rate=0", "max_samples=16", "per_device_train_batch_size=16", "gradient_accumulation_steps=1",
            "dataset=identity")
    _, _, plain = train(tmp_path, "plain", *keys, "cutoff_len=256", steps=1)
    _, log, packed = train(tmp_path, "packed", *keys, "cutoff_len=4096", "packing=true", "neat_packing=true", steps=1)
    assert "training: 1 examples" in log or "training: 2 examples" in log, log[-2000:]  # 16 documents, packed
    assert packed[0] == pytest.approx(plain[0], rel=1e-2), (packed, plain)


def test_offloaded_activations_train(tmp_path):
    _, log, losses = train(tmp_path, "offload", "gradient_checkpointing=true", "offload_activations=true")
    assert "offload" in log.lower()
    assert min(losses[-3:]) < losses[0] - 0.3, losses


def test_torchrun_single_process_nccl(tmp_path):
    _, log, losses = train(tmp_path, "nccl", env_extra={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1",
                                                         "MASTER_PORT": "29531"}, steps=6)
    assert "backend=nccl" in log, log[-2000:]
    assert len(losses) == 6


def test_qlora_4bit_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    _, log, losses = train(tmp_path, "qlora", "quantization_bit=4")
    assert min(losses[-3:]) < losses[0] - 0.2, losses
