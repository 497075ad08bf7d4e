"""Packed rows: every sample attends only to itself (block-diagonal attention from position ids)."""

from __future__ import annotations

import pytest
import torch

from lmf.loss import causal_lm_loss
from lmf.model.forward import decoder_hidden_states, lm_head_of


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


@pytest.mark.parametrize("stage,extra", [("pt", {"dataset": "c4_demo", "max_samples": 12, "cutoff_len": 96}),
                                         ("sft", {"dataset": "alpaca_en_demo", "max_samples": 24, "cutoff_len": 512,
                                                  "train_on_prompt": True})])
def test_packing_trains_on_the_same_targets_as_unpacked(tiny_model_dir, demo_data_dir, tmp_path, stage, extra):
    """Packed rows never train a sample's last position on the next sample's first token: the label count
    and the summed loss over the dataset equal the unpacked ones (pt packs by default; sft with train_on_prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmf.config.parser import build_config
    from lmf.data.collator import SFTCollator
    from lmf.data.loader import get_dataset
    from lmf.data.template import get_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_template("qwen", tok)
    base = dict(model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, template="qwen",
                stage=stage, preprocessing_cache_dir=str(tmp_path / "cache"), **extra)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    totals = {}
    for packing in (False, True):
        data = get_dataset(build_config(dict(base, packing=packing)), tok, template, stage).train_dataset
        assert ("position_ids" in data.column_names) == packing
        loss, count = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for start in range(0, len(data), 4):
                batch = SFTCollator(tok)([data[i] for i in range(start, min(start + 4, len(data)))])
                hidden = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"],
                                               batch.get("position_ids"))
                s, n = causal_lm_loss(hidden, lm_head_of(model), batch["labels"])
                loss += s.double()
                count += int(n)
        totals[packing] = (loss.item(), count, len(data))
    (plain_loss, plain_n, plain_rows), (packed_loss, packed_n, packed_rows) = totals[False], totals[True]
    assert packed_rows < plain_rows  # rows were really packed
    assert packed_n == plain_n
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)
