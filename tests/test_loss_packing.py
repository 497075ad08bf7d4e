"""Packed rows: every sample attends only to itself (block-diagonal attention from position ids)."""

from __future__ import annotations

import pytest
import torch

from lmf.loss import causal_lm_loss, decoder_hidden_states, lm_head_of


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_attend_across_boundaries(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(5, 1000, (1, 7), generator=gen)
    b = torch.randint(5, 1000, (1, 5), generator=gen)
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # two samples + right padding
    position_ids = torch.tensor([list(range(7)) + list(range(5)) + [0, 0, 0]])
    with torch.no_grad():
        alone_a = decoder_hidden_states(model, a)
        alone_b = decoder_hidden_states(model, b)
        together = decoder_hidden_states(model, packed, torch.ones_like(packed), position_ids)
    torch.testing.assert_close(together[:, :7], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 7:12], alone_b, atol=1e-5, rtol=1e-5)


def test_packed_loss_equals_sum_of_separate_losses(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = lm_head_of(model)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(5, 1000, (1, 6), generator=gen)
    b = torch.randint(5, 1000, (1, 8), generator=gen)
    la, lb = a.clone(), b.clone()
    la[:, :2] = -100
    lb[:, :3] = -100
    packed_ids = torch.cat([a, b], dim=1)
    # the first token of b is a prompt token, so no label crosses the boundary
    packed_labels = torch.cat([la, lb], dim=1)
    position_ids = torch.tensor([list(range(6)) + list(range(8))])
    with torch.no_grad():
        sa, na = causal_lm_loss(decoder_hidden_states(model, a), head, la)
        sb, nb = causal_lm_loss(decoder_hidden_states(model, b), head, lb)
        sp, n_p = causal_lm_loss(decoder_hidden_states(model, packed_ids, None, position_ids), head, packed_labels)
    assert int(n_p) == int(na) + int(nb)
    torch.testing.assert_close(sp, sa + sb, atol=1e-4, rtol=1e-5)
