"""Fused LoRA linear (lmf.model.fused_lora): the same outputs and gradients as peft's forward,
and peft's own forward wherever the call is not the plain LoRA case."""

from __future__ import annotations

import pytest
import torch

from lmf.model import fused_lora
from lmf.model.fused_lora import LoraLinearFunction, fuse_lora_layers

torch.set_num_threads(1)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(model_dir, dropout=0.0, targets=TARGETS):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    return get_peft_model(base, config)


def _count_fused(monkeypatch):
    calls = []
    original = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = logits.float().log_softmax(-1)[..., 7].mean() + logits.square().mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck(with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 6, dtype=torch.float64, generator=gen)
    bias = torch.randn(7, dtype=torch.float64, generator=gen) if with_bias else None
    a = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinearFunction.apply(x, weight, bias, a, b, 1.7), (x, a, b))
    expected = torch.nn.functional.linear(x, weight, bias) + (x @ a.t() @ b.t()) * 1.7
    torch.testing.assert_close(LoraLinearFunction.apply(x, weight, bias, a, b, 1.7), expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_logits_and_grads_as_peft(tiny_model_dir, monkeypatch, checkpointing):
    from lmf.model.checkpointing import apply_activation_checkpointing

    model = _lora_model(tiny_model_dir).train()
    if checkpointing:
        apply_activation_checkpointing(model)
        model.enable_input_require_grads()
    ids = torch.randint(5, 1000, (2, 11), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    assert fuse_lora_layers(model) == 2 * len(TARGETS)
    calls = _count_fused(monkeypatch)
    logits, grads = _loss_and_grads(model, ids)
    assert len(calls) == 2 * len(TARGETS) * (2 if checkpointing else 1)  # the recompute is fused too
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and sum("lora_A" in n for n in grads) == 2 * len(TARGETS)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_peft_switches_keep_peft_forward(tiny_model_dir, monkeypatch):
    model = _lora_model(tiny_model_dir).eval()
    fuse_lora_layers(model)
    ids = torch.randint(5, 1000, (1, 9), generator=torch.Generator().manual_seed(2))
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        assert calls
        calls.clear()
        with model.disable_adapter():  # DPO's reference pass: the base model
            base = model(input_ids=ids).logits
        assert not calls
        fused_lora.unfuse_lora_layers(model)  # peft's forward again
        unfused = model(input_ids=ids).logits
        fused_lora.fuse_lora_layers(model)
        assert not calls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        assert not calls
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        assert not calls
        model.unmerge_adapter()
    torch.testing.assert_close(adapted, unfused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, unfused, atol=1e-4, rtol=1e-4)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(base, original)
    assert not torch.allclose(base, adapted)


def test_dropout_in_training_keeps_peft_forward(tiny_model_dir, monkeypatch):
    model = _lora_model(tiny_model_dir, dropout=0.1, targets=["q_proj"])
    fuse_lora_layers(model)
    calls = _count_fused(monkeypatch)
    ids = torch.randint(5, 1000, (1, 6))
    model.train()(input_ids=ids)
    assert not calls
    with torch.no_grad():
        model.eval()(input_ids=ids)  # dropout is the identity in eval mode
    assert len(calls) == 2


def test_saved_adapter_is_unchanged(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model = _lora_model(tiny_model_dir)
    model.save_pretrained(tmp_path / "plain")
    fuse_lora_layers(model)
    model.save_pretrained(tmp_path / "fused")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    fused = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert plain.keys() == fused.keys() and plain
    for key in plain:
        assert torch.equal(plain[key], fused[key])


@pytest.mark.parametrize("on", [True, False])
def test_training_models_get_it_unless_turned_off(tiny_model_dir, tmp_path, on):
    from lmf.config.parser import get_config
    from lmf.model.loader import load_model, load_tokenizer

    cfg = get_config([f"model_name_or_path={tiny_model_dir}", "stage=sft", "finetuning_type=lora",
                      f"output_dir={tmp_path}", "use_cpu=true", f"fused_lora={str(on).lower()}"])
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    fused = [m for m in model.modules() if "forward" in vars(m)]
    assert len(fused) == (2 * len(TARGETS) if on else 0)
    assert all(m.forward.__func__ is fused_lora.fused_forward for m in fused)
