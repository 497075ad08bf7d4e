"""CUDA-only checks (skipped on CPU): padding-free batches and the fused LoRA linear on the GPU."""

from __future__ import annotations

import pytest
import torch

from lmf.loss import causal_lm_loss
from lmf.model.forward import decoder_hidden_states, lm_head_of, set_padding_free

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmf.model.fused_lora import fuse_lora_layers

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).cuda().train()
    assert fuse_lora_layers(model) == 6
    return model


def _step(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    hidden = decoder_hidden_states(model, ids, mask)
    loss, count = causal_lm_loss(hidden, lm_head_of(model), labels)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return hidden.detach().float(), loss.detach().float(), int(count), grads


def test_padding_free_cuda_matches_the_padded_batch(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    lengths, width = [37, 5, 64, 20], 64
    ids = torch.randint(5, 1000, (len(lengths), width), device="cuda")
    mask = (torch.arange(width, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    h, loss, count, grads = _step(model, ids, mask, labels)
    set_padding_free(model, False)
    ref_h, ref_loss, ref_count, ref_grads = _step(model, ids, mask, labels)
    real = mask.bool()
    torch.testing.assert_close(h[real], ref_h[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-4)
    assert count == ref_count and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_fused_lora_bf16_cuda_matches_peft(tiny_model_dir, monkeypatch):
    model = _lora_model(tiny_model_dir).to(torch.bfloat16)
    ids = torch.randint(5, 1000, (2, 33), device="cuda")
    out = model(input_ids=ids).logits.float()
    from lmf.model import fused_lora

    fused_lora.unfuse_lora_layers(model)
    ref = model(input_ids=ids).logits.float()
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
