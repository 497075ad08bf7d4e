"""DPO objective on the tiny model: reference via disabled adapters, losses at init, learning a toy preference."""

from __future__ import annotations

import math

import pytest
import torch

from lmf.loss import sequence_logps
from lmf.model.forward import decoder_hidden_states, lm_head_of
from lmf.train.dpo.objective import REF_CHOSEN, REF_REJECTED, DPOObjective
from lmf.train.reference import paired_logps, reference_logps

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

torch.set_num_threads(1)

PROMPTS = ["Is the sky blue?", "Name a fruit.", "Say something nice.", "What is 2+2?"]
CHOSEN = "Good answer, thank you."
REJECTED = "bad bad bad"


def make_batch(tokenizer, prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED):
    """A PairwiseCollator-shaped batch: rows [0:B] chosen, [B:2B] rejected, right-padded, prompt masked."""
    rows = []
    for answer in (chosen, rejected):
        for p in prompts:
            prompt = tokenizer.encode(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n")
            resp = tokenizer.encode(f"{answer}<|im_end|>")
            rows.append((prompt + resp, [-100] * len(prompt) + resp))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture()
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_paired_logps_match_separate_forwards(lora_model, tokenizer):
    batch = make_batch(tokenizer)
    with torch.no_grad():
        c, r, lc, lr = paired_logps(lora_model, batch)
        h = decoder_hidden_states(lora_model, batch["input_ids"][:4], batch["attention_mask"][:4])
        c_alone, lc_alone = sequence_logps(h, lm_head_of(lora_model), batch["labels"][:4])
    assert torch.allclose(c, c_alone, atol=1e-5) and torch.equal(lc, lc_alone)
    assert (lc > 0).all() and (lr > 0).all() and c.shape == r.shape == (4,)


def test_reference_is_base_model_with_adapters_disabled(lora_model, tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():  # make the adapter non-trivial
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = make_batch(tokenizer)
    ref_c, ref_r = reference_logps(lora_model, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_c, base_r, _, _ = paired_logps(base, batch)
        pol_c, _, _, _ = paired_logps(lora_model, batch)
    assert torch.allclose(ref_c, base_c, atol=1e-5) and torch.allclose(ref_r, base_r, atol=1e-5)
    assert not torch.allclose(pol_c, base_c, atol=1e-3)  # adapters are back on afterwards
    # a separate frozen reference model gives the same numbers
    ref_c2, _ = reference_logps(lora_model, batch, ref_model=base)
    assert torch.allclose(ref_c2, base_c)


def test_full_finetuning_without_reference_is_an_error(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="reference"):
        DPOObjective()(model, make_batch(tokenizer))


def test_sigmoid_at_init_is_log2_and_counts_pairs(lora_model, tokenizer):
    loss_sum, n, metrics = DPOObjective(beta=0.1)(lora_model, make_batch(tokenizer))
    assert n.item() == 4
    assert (loss_sum / n).item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def test_precomputed_reference_columns_are_used(lora_model, tokenizer):
    batch = make_batch(tokenizer)
    batch[REF_CHOSEN] = torch.full((4,), -100.0)
    batch[REF_REJECTED] = torch.full((4,), -50.0)
    _, _, metrics = DPOObjective(beta=0.1)(lora_model, batch)
    with torch.no_grad():
        c, r, _, _ = paired_logps(lora_model, batch)
    assert metrics["rewards/chosen"] == pytest.approx(0.1 * (c + 100).mean().item(), abs=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(0.1 * (r + 50).mean().item(), abs=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_every_loss_learns_the_toy_preference(lora_model, tokenizer, loss_type):
    batch = make_batch(tokenizer)
    objective = DPOObjective(loss_type=loss_type, beta=0.1 if loss_type != "simpo" else 2.0)
    params = [p for p in lora_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    margins = []
    for _ in range(8):
        loss_sum, n, metrics = objective(lora_model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        margins.append(metrics["rewards/margins"])
    _, _, final = objective(lora_model, batch)
    assert final["rewards/accuracies"] == 1.0
    assert final["rewards/margins"] > margins[0] + 1e-3
    if loss_type == "orpo":
        assert {"sft_loss", "odds_ratio_loss"} <= set(final)


def _pair_rows(tokenizer, prompts=PROMPTS):
    rows = []
    for p in prompts:
        prompt = tokenizer.encode(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n")
        row = {}
        for key, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
            resp = tokenizer.encode(f"{answer}<|im_end|>")
            row[f"{key}_input_ids"] = prompt + resp
            row[f"{key}_attention_mask"] = [1] * len(prompt + resp)
            row[f"{key}_labels"] = [-100] * len(prompt) + resp
        rows.append(row)
    return rows


def _toy_pair_collator(pad_id):
    def collate(features):
        seqs = [(f[f"{k}_input_ids"], f[f"{k}_labels"]) for k in ("chosen", "rejected") for f in features]
        width = max(len(s) for s, _ in seqs)
        return {
            "input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s, _ in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for _, y in seqs]),
        }
    return collate


def test_precompute_reference_logps_matches_on_the_fly(lora_model, tokenizer):
    from datasets import Dataset

    from lmf.train.dpo.precompute import WithReferenceLogps, precompute_reference_logps

    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    dataset = Dataset.from_list(_pair_rows(tokenizer))
    collator = WithReferenceLogps(_toy_pair_collator(tokenizer.pad_token_id))
    dataset = precompute_reference_logps(dataset, collator, lora_model, batch_size=3)
    assert {REF_CHOSEN, REF_REJECTED} <= set(dataset.column_names)
    batch = collator([dataset[i] for i in range(4)])
    on_the_fly = reference_logps(lora_model, {k: v for k, v in batch.items() if not k.startswith("ref_")})
    assert torch.allclose(batch[REF_CHOSEN], on_the_fly[0], atol=1e-4)
    assert torch.allclose(batch[REF_REJECTED], on_the_fly[1], atol=1e-4)
    # the objective gives the same loss from the columns as from the disabled-adapter forward
    with_cols, _, _ = DPOObjective()(lora_model, batch)
    without, _, _ = DPOObjective()(lora_model, {k: v for k, v in batch.items() if not k.startswith("ref_")})
    assert with_cols.item() == pytest.approx(without.item(), abs=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_chunked_log_probs_give_the_same_loss_and_gradients(lora_model, tokenizer, loss_type):
    batch = make_batch(tokenizer)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    results = []
    for opts in ({}, {"chunk_size": 5}):
        lora_model.zero_grad()
        loss_sum, n, metrics = DPOObjective(loss_type=loss_type, loss_opts=opts)(lora_model, batch)
        loss_sum.backward()
        grads = [p.grad.clone() for p in lora_model.parameters() if p.requires_grad]
        results.append((loss_sum.item(), metrics, grads))
    (plain, m_plain, g_plain), (chunked, m_chunked, g_chunked) = results
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert m_chunked["rewards/margins"] == pytest.approx(m_plain["rewards/margins"], rel=1e-4, abs=1e-6)
    for a, b in zip(g_plain, g_chunked):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
