"""Activation checkpointing (+ CPU offload) gives the same gradients, and liger selection logic."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from torch import nn

from lmf.loss import IGNORE_INDEX, causal_lm_loss
from lmf.model.forward import decoder_hidden_states, lm_head_of

torch.set_num_threads(1)


def _batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 20), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return input_ids, labels


def _step(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    hidden = decoder_hidden_states(model, input_ids, torch.ones_like(input_ids))
    loss_sum, count = causal_lm_loss(hidden, lm_head_of(model), labels, chunk_size=8)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_sum.detach(), grads


def _load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()  # checkpointing only acts in training mode; the tiny model has no dropout
    return model


def _count_layer_checkpoints(model, calls):
    from lmf.model.checkpointing import _is_checkpointed_layer

    for module in model.modules():
        if _is_checkpointed_layer(module):
            inner = module._gradient_checkpointing_func

            def counted(function, *args, _inner=inner, **kwargs):
                calls.append(1)
                return _inner(function, *args, **kwargs)

            module._gradient_checkpointing_func = counted


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_same_grads(tiny_model_dir, use_reentrant):
    from lmf.model.checkpointing import apply_activation_checkpointing

    model = _load(tiny_model_dir)
    input_ids, labels = _batch(model.config.vocab_size)
    ref_loss, ref_grads = _step(model, input_ids, labels)

    layers = apply_activation_checkpointing(model, offload_to_cpu=False, use_reentrant=use_reentrant)
    assert layers == model.config.num_hidden_layers
    calls = []
    _count_layer_checkpoints(model, calls)
    loss, grads = _step(model, input_ids, labels)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_offload_moves_saved_tensors_through_cpu_hooks(tiny_model_dir, monkeypatch):
    """With offload on, the layer inputs go through save_on_cpu's pack/unpack hooks (forced on CPU)."""
    import lmf.model.checkpointing as ckpt

    packed = []

    @contextlib.contextmanager
    def recording_offload(device_type):
        def pack(tensor):
            packed.append(tuple(tensor.shape))
            return tensor.to("cpu", copy=True)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    model = _load(tiny_model_dir)
    input_ids, labels = _batch(model.config.vocab_size, seed=1)
    ref_loss, ref_grads = _step(model, input_ids, labels)

    ckpt.apply_activation_checkpointing(model, offload_to_cpu=True, use_reentrant=False)
    monkeypatch.setattr(ckpt, "offload_context", recording_offload)
    loss, grads = _step(model, input_ids, labels)
    hidden_shape = (2, 20, model.config.hidden_size)
    # each checkpointed layer saves its input hidden states, and only a handful of tensors
    assert packed.count(hidden_shape) >= model.config.num_hidden_layers
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_offload_context_is_noop_on_cpu():
    from lmf.model.checkpointing import offload_context

    assert isinstance(offload_context("cpu"), contextlib.nullcontext)
    assert type(offload_context("cuda")).__name__ == "save_on_cpu"


def test_checkpointing_with_lora_reentrant(tiny_model_dir):
    """LoRA with frozen embeddings + reentrant checkpointing still trains the adapters."""
    from peft import LoraConfig, get_peft_model

    from lmf.model.checkpointing import apply_activation_checkpointing

    model = get_peft_model(_load(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    apply_activation_checkpointing(model, offload_to_cpu=False, use_reentrant=True)
    input_ids, labels = _batch(model.config.vocab_size, seed=2)
    _, grads = _step(model, input_ids, labels)
    lora = [name for name in grads if "lora_" in name]
    assert len(lora) == sum(1 for name, _ in model.named_parameters() if "lora_" in name)  # none left without grad
    assert lora and all(grads[name].abs().sum() > 0 for name in lora if "lora_B" in name)  # lora_A gets 0 while B is 0


def test_checkpointing_unsupported_model_is_clear_error():
    from lmf.extras.errors import NotAvailableError
    from lmf.model.checkpointing import apply_activation_checkpointing

    class NoCheckpointLM(nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(NotAvailableError, match="disable_gradient_checkpointing"):
        apply_activation_checkpointing(NoCheckpointLM())


# ------------------------------------------------------------------ liger selection (mocked)


class _FakeCudaTensor:
    class device:
        type = "cuda"


def test_liger_selection(monkeypatch):
    import lmf.loss.liger as loss

    monkeypatch.setattr(loss, "liger_available", lambda: True)
    assert loss.use_liger_for(_FakeCudaTensor(), use_liger=True)
    assert not loss.use_liger_for(_FakeCudaTensor(), use_liger=False)
    assert not loss.use_liger_for(torch.zeros(1), use_liger=True)  # never on CPU
    monkeypatch.setattr(loss, "liger_available", lambda: False)
    assert not loss.use_liger_for(_FakeCudaTensor(), use_liger=True)  # not installed: chunked


def test_liger_path_calls_fused_kernel_with_label_rows(monkeypatch):
    """When selected, causal_lm_loss hands liger the label rows, the weight and reduction='sum'."""
    import lmf.loss as loss

    seen = {}

    class FakeLigerLoss:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def __call__(self, weight, rows, targets, bias):
            seen["shapes"] = (tuple(weight.shape), tuple(rows.shape), targets.tolist())
            logits = rows @ weight.t()
            return nn.functional.cross_entropy(logits, targets, reduction="sum")

    fake = types.ModuleType("liger_kernel.transformers")
    fake.LigerFusedLinearCrossEntropyLoss = FakeLigerLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    import lmf.loss.ce

    monkeypatch.setattr(lmf.loss.ce, "use_liger_for", lambda hidden, use_liger: use_liger)

    head = nn.Linear(6, 11, bias=False)
    hidden = torch.randn(1, 5, 6)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5]])
    value, count = loss.causal_lm_loss(hidden, head, labels, chunk_size=2, use_liger=True, softcap=30.0)
    plain, _ = loss.causal_lm_loss(hidden, head, labels, None)
    assert seen["kwargs"] == {"ignore_index": IGNORE_INDEX, "reduction": "sum", "softcap": 30.0}
    assert seen["shapes"] == ((11, 6), (3, 6), [3, 4, 5]) and count.item() == 3
    torch.testing.assert_close(value, plain)


def test_loss_kwargs_from_config(tiny_model_dir):
    from lmf.config.args import ModelArguments
    from lmf.loss import loss_kwargs

    model = _load(tiny_model_dir)
    assert loss_kwargs(ModelArguments(), model) == {"chunk_size": 1024, "softcap": None, "use_liger": False}
    args = ModelArguments(use_chunked_loss=False, enable_liger_kernel=True)
    assert loss_kwargs(args, model) == {"chunk_size": None, "softcap": None, "use_liger": True}
    model.config.final_logit_softcapping = 30.0
    assert loss_kwargs(ModelArguments(loss_chunk_size=256), model)["softcap"] == 30.0

    from lmf.extras.errors import ConfigError

    with pytest.raises(ConfigError, match="loss_chunk_size"):
        loss_kwargs(ModelArguments(loss_chunk_size=0), model)


def test_unset_loss_chunk_size_keeps_a_chunk_of_logits_near_256_mib():
    from lmf.loss.ce import auto_chunk_size

    assert auto_chunk_size(151936) == 384  # Qwen: 384 x 151,936 fp32 = 223 MiB (1024 rows would be 594 MiB)
    assert auto_chunk_size(65536) == 1024 and auto_chunk_size(32000) == 1024 and auto_chunk_size(None) == 1024
    assert auto_chunk_size(262144) == 256 and auto_chunk_size(10**7) == 128
    for vocab in (151936, 202048, 262144):
        assert auto_chunk_size(vocab) * vocab * 4 <= 256 * 2**20
