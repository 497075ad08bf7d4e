"""Padding-free batches (lmf.model.forward.decoder_hidden_states): a padded batch runs without its padding and
gives the padded batch's hidden states, loss and gradients at every real position."""

from __future__ import annotations

import pytest
import torch

from lmf.loss import causal_lm_loss
from lmf.model.forward import decoder_hidden_states, lm_head_of, set_packed_sdpa, set_padding_free

torch.set_num_threads(1)


def _load(model_dir, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)


def _right_padded(lengths: list[int], width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return ids, mask, labels


def _decoder_inputs(model):
    """Records the input_ids shape of every decoder call."""
    seen = []
    decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    decoder.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
                                      with_kwargs=True)
    return seen


def _step(model, ids, mask, labels, position_ids=None):
    model.zero_grad(set_to_none=True)
    hidden = decoder_hidden_states(model, ids, mask, position_ids)
    loss, count = causal_lm_loss(hidden, lm_head_of(model), labels)
    (loss + hidden[mask.bool()].square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), loss.detach(), int(count), grads


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("lengths,width", [([12, 7, 3], 12), ([1, 20], 20), ([9, 9, 2, 16], 16)])
def test_same_hidden_states_loss_and_grads_as_the_padded_batch(arch, lengths, width, tiny_model_dir, tiny_llama_dir):
    model = _load(tiny_model_dir if arch == "qwen3" else tiny_llama_dir).train()
    ids, mask, labels = _right_padded(lengths, width, seed=width)
    seen = _decoder_inputs(model)
    h, loss, count, grads = _step(model, ids, mask, labels)
    assert seen == [(1, sum(lengths))]  # one row of real tokens only
    set_padding_free(model, False)
    ref_h, ref_loss, ref_count, ref_grads = _step(model, ids, mask, labels)
    assert seen[1] == (len(lengths), width)
    real = mask.bool()
    torch.testing.assert_close(h[real], ref_h[real], atol=2e-5, rtol=1e-5)
    assert torch.count_nonzero(h[~real]) == 0  # padding positions hold zeros
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    assert count == ref_count
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_packed_rows_lose_their_batch_padding(tiny_model_dir):
    model = _load(tiny_model_dir).train()
    width = 16
    position_ids = torch.tensor([list(range(5)) + list(range(8)) + [0, 0, 0], list(range(9)) + [0] * 7])
    mask = torch.tensor([[1] * 13 + [0] * 3, [1] * 9 + [0] * 7])
    ids = torch.randint(5, 1000, (2, width), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    seen = _decoder_inputs(model)
    h, loss, _, grads = _step(model, ids, mask, labels, position_ids)
    set_padding_free(model, False)
    ref_h, ref_loss, _, ref_grads = _step(model, ids, mask, labels, position_ids)
    assert seen == [(1, 22), (2, width)]
    torch.testing.assert_close(h[mask.bool()], ref_h[mask.bool()], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_lora_with_gradient_checkpointing(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from lmf.model.checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    model = get_peft_model(_load(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                             init_lora_weights=False)).train()
    apply_activation_checkpointing(model)
    ids, mask, labels = _right_padded([10, 4, 15], 15, seed=3)
    seen = _decoder_inputs(model)
    h, loss, _, grads = _step(model, ids, mask, labels)
    set_padding_free(model, False)
    ref_h, ref_loss, _, ref_grads = _step(model, ids, mask, labels)
    assert seen == [(1, 29), (3, 15)]
    assert any("lora_A" in n for n in grads)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_only_where_it_applies(tiny_model_dir, monkeypatch):
    sdpa, eager = _load(tiny_model_dir).eval(), _load(tiny_model_dir, "eager").eval()
    ids, mask, _ = _right_padded([6, 3], 6)
    seen_sdpa, seen_eager = _decoder_inputs(sdpa), _decoder_inputs(eager)
    with torch.no_grad():
        decoder_hidden_states(eager, ids, mask)  # eager attention: the padded batch
        decoder_hidden_states(sdpa, ids, torch.ones_like(mask))  # no padding: nothing to drop
        left = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])  # left padding: positions would move
        decoder_hidden_states(sdpa, ids, left)
        set_packed_sdpa(sdpa, False)  # the per-segment path is off (packed_sdpa: false)
        decoder_hidden_states(sdpa, ids, mask)
        set_packed_sdpa(sdpa, True)
        decoder_hidden_states(sdpa, ids, mask)
    assert seen_eager == [(2, 6)]
    assert seen_sdpa == [(2, 6), (2, 6), (2, 6), (1, 9)]


def test_config_key_reaches_the_model(tiny_model_dir, tmp_path):
    from lmf.config.parser import get_config
    from lmf.model.loader import load_model, load_tokenizer

    for value in (True, False):
        cfg = get_config([f"model_name_or_path={tiny_model_dir}", "stage=sft", "finetuning_type=lora",
                          f"output_dir={tmp_path}", f"padding_free={str(value).lower()}", "use_cpu=true"])
        model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
        ids, mask, _ = _right_padded([5, 2], 5)
        seen = _decoder_inputs(model)
        with torch.no_grad():
            decoder_hidden_states(model, ids, mask)
        assert seen == ([(1, 7)] if value else [(2, 5)])
