"""CUDA-only checks (skipped on CPU): bf16 chunked loss, liger path, activation offload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmf.loss import IGNORE_INDEX, causal_lm_loss, liger_available, sequence_logps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _case(vocab=32000, width=512, batch=2, seq_len=700, dtype=torch.bfloat16):
    torch.manual_seed(0)
    head = nn.Linear(width, vocab, bias=False).cuda().to(dtype)
    hidden = torch.randn(batch, seq_len, width, device="cuda", dtype=dtype)
    labels = torch.randint(0, vocab, (batch, seq_len), device="cuda")
    labels[:, :100] = IGNORE_INDEX
    return head, hidden, labels


def _run(fn, head, hidden, labels, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    value, count = fn(hidden, head, labels, **kw)
    if value.dim() == 0:
        (value / count).backward()
    else:
        (value * torch.linspace(-1, 1, value.shape[0], device="cuda")).sum().backward()
    return value.detach().float(), hidden.grad.float(), head.weight.grad.float()


def _close(a, b, atol, rtol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@pytest.mark.parametrize("fn", [causal_lm_loss, sequence_logps], ids=["ce", "logps"])
def test_chunked_bf16_cuda_matches_plain(fn):
    head, hidden, labels = _case()
    plain = _run(fn, head, hidden, labels, chunk_size=None)
    chunked = _run(fn, head, hidden, labels, chunk_size=256)
    _close(chunked, plain, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not liger_available(), reason="liger-kernel not installed")
def test_liger_cuda_matches_plain():
    head, hidden, labels = _case()
    plain = _run(causal_lm_loss, head, hidden, labels, chunk_size=None)
    fused = _run(causal_lm_loss, head, hidden, labels, chunk_size=256, use_liger=True)
    _close(fused, plain, atol=2e-2, rtol=2e-2)


def test_chunked_peak_memory_is_bounded():
    """At 8k label tokens x 151,936 vocab the chunked loss stays far below the plain path's peak."""
    head, hidden, labels = _case(vocab=151936, width=256, batch=1, seq_len=8192)
    peaks = {}
    for chunk_size in (None, 1024):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(causal_lm_loss, head, hidden, labels, chunk_size=chunk_size)
        torch.cuda.synchronize()
        peaks[chunk_size] = torch.cuda.max_memory_allocated() - base
    chunk_logits_bytes = 1024 * 151936 * 4
    assert peaks[1024] < 4 * chunk_logits_bytes + 2 * head.weight.numel() * 4
    assert peaks[None] > 4 * peaks[1024]


def test_offload_on_cuda_same_grads_and_less_memory(tmp_path):
    from lmf.model.forward import decoder_hidden_states, lm_head_of
    from lmf.model.checkpointing import apply_activation_checkpointing
    from lmf.testing.tiny import build_config

    from transformers import AutoModelForCausalLM

    config = build_config("qwen3", vocab_size=1024, hidden_size=512, num_layers=6, intermediate_size=1024)
    input_ids = torch.randint(0, 1024, (1, 4096), device="cuda")
    results = {}
    for mode in ("none", "ckpt", "offload"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda().train()
        if mode != "none":
            apply_activation_checkpointing(model, offload_to_cpu=mode == "offload")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hidden = decoder_hidden_states(model, input_ids)
        loss_sum, count = causal_lm_loss(hidden, lm_head_of(model), input_ids, chunk_size=1024)
        (loss_sum / count).backward()
        torch.cuda.synchronize()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[mode] = (torch.cuda.max_memory_allocated() - base, grads)
        del model, hidden
    for mode in ("ckpt", "offload"):
        torch.testing.assert_close(results[mode][1], results["none"][1], atol=1e-4, rtol=1e-3)
    assert results["ckpt"][0] < results["none"][0]
    assert results["offload"][0] < results["ckpt"][0]


@pytest.mark.skipif(not liger_available(), reason="liger-kernel not installed")
def test_liger_module_kernels_keep_the_models_loss_and_gradients(tiny_model_dir):
    """enable_liger_kernel on CUDA patches liger's rope / swiglu / rms_norm into the model: same loss, gradients."""
    from transformers import AutoModelForCausalLM

    from lmf.loss.liger import apply_module_kernels

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    before = model(ids, labels=ids).loss
    before.backward()
    grad = model.model.layers[0].mlp.gate_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    assert apply_module_kernels(model, {"rope": True, "swiglu": True, "rms_norm": True}, torch.device("cuda"))
    after = model(ids, labels=ids).loss
    after.backward()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.model.layers[0].mlp.gate_proj.weight.grad, grad, rtol=1e-3, atol=1e-4)
