"""Pairwise Bradley-Terry objective on the tiny model: hand-computed loss, learning a separable toy set."""

from __future__ import annotations

import math

import pytest
import torch

from lmf.model.value_head import add_value_head, score
from lmf.train.rm import PairwiseRMObjective, bradley_terry_loss, pairwise_scores

from test_dpo_objective import make_batch  # noqa: E402  (shared toy batch builder)

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

torch.set_num_threads(1)


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_bradley_terry_hand_values():
    losses = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0))])


def test_pair_scores_are_last_token_scores(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    add_value_head(model, seed=0)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        chosen, rejected = pairwise_scores(model, batch)
        direct = score(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(torch.cat([chosen, rejected]), direct)
    loss_sum, n, metrics = PairwiseRMObjective()(model, batch)
    assert n.item() == 4
    assert loss_sum.item() == pytest.approx(bradley_terry_loss(chosen, rejected).sum().item(), rel=1e-5)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_accuracy_rises_on_separable_pairs(tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, target_modules="all-linear"))
    add_value_head(model, seed=0)
    # chosen/rejected swapped relative to what a random head might prefer: make the start informative
    batch = make_batch(tokenizer)
    objective = PairwiseRMObjective()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first_loss = None
    for _ in range(15):
        loss_sum, n, metrics = objective(model, batch)
        first_loss = first_loss if first_loss is not None else (loss_sum / n).item()
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    loss_sum, n, final = objective(model, batch)
    assert final["accuracy"] == 1.0
    assert (loss_sum / n).item() < first_loss * 0.5
    assert final["scores/margins"] > 0
