"""Right-padded CPU batches drop the padding mask (or the padding, padding-free): real positions and the loss are unchanged."""

from __future__ import annotations

import pytest
import torch

import lmf.model.forward as loss_mod
from lmf.loss import causal_lm_loss
from lmf.model.forward import decoder_hidden_states, lm_head_of


def test_right_padding_detection():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    holes = torch.tensor([[1, 0, 1, 0]])
    assert loss_mod._right_padded_cpu(right)
    assert not loss_mod._right_padded_cpu(left)
    assert not loss_mod._right_padded_cpu(holes)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dropped_mask_gives_the_same_hidden_states_and_loss(tiny_model_dir, attn, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        fast = decoder_hidden_states(model, ids, mask)
        fast_loss = causal_lm_loss(fast, lm_head_of(model), labels)
        loss_mod.set_padding_free(model, False)  # the padded batch, then with its mask
        dropped = decoder_hidden_states(model, ids, mask)
        monkeypatch.setattr(loss_mod, "_right_padded_cpu", lambda m: False)  # the masked path
        masked = decoder_hidden_states(model, ids, mask)
        masked_loss = causal_lm_loss(masked, lm_head_of(model), labels)
    real = mask.bool()
    torch.testing.assert_close(fast[real], masked[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[real], masked[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_loss[0], masked_loss[0], atol=1e-5, rtol=1e-5)
    assert int(fast_loss[1]) == int(masked_loss[1])
