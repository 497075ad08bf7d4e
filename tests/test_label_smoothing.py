"""label_smoothing_factor: every loss path (chunked, plain, a non-Linear head) equals transformers' LabelSmoother,
which LLaMA-Factory's SFT trainer uses, in value and gradients; refused where it does not apply."""

from __future__ import annotations

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

EPS = 0.1


def _label_smoother(logits, labels, eps):
    """transformers' LabelSmoother on next-token logits (shift_labels=True): the mean over label tokens."""
    from transformers.trainer_pt_utils import LabelSmoother

    return LabelSmoother(epsilon=eps)({"logits": logits}, labels, shift_labels=True)


def _batch(vocab=50, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 7, hidden, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    return h, head, labels


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_the_loss_and_its_gradients_equal_transformers_label_smoother(chunk_size):
    from lmf.loss import causal_lm_loss

    h, head, labels = _batch()
    loss_sum, n = causal_lm_loss(h, head, labels, chunk_size, label_smoothing=EPS)
    (loss_sum / n).backward()
    got = (h.grad.clone(), head.weight.grad.clone())
    h.grad, head.weight.grad = None, None
    want = _label_smoother(head(h), labels, EPS)
    want.backward()
    torch.testing.assert_close(loss_sum / n, want)
    torch.testing.assert_close(got[0], h.grad)
    torch.testing.assert_close(got[1], head.weight.grad)
    plain_sum, _ = causal_lm_loss(h, head, labels, chunk_size)
    assert not torch.allclose(plain_sum, loss_sum)  # smoothing changed it


def test_a_head_that_is_not_a_linear_smooths_as_well():
    from lmf.loss import causal_lm_loss

    h, head, labels = _batch(seed=1)
    wrapped = torch.nn.Sequential(head)  # not an nn.Linear: the per-chunk checkpointed path
    loss_sum, n = causal_lm_loss(h, wrapped, labels, 4, label_smoothing=EPS)
    torch.testing.assert_close(loss_sum / n, _label_smoother(head(h), labels, EPS))


def test_the_sft_objective_on_a_model_equals_the_label_smoother_on_its_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lmf.train.sft import SFTObjective

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = build_config({"model_name_or_path": tiny_model_dir, "label_smoothing_factor": EPS})
    objective = SFTObjective(cfg, model, collator=None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        loss_sum, n, _ = objective.compute_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                        "labels": labels})
        want = _label_smoother(model(input_ids=ids).logits, labels, EPS)
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys, message", [
    ({"stage": "dpo"}, r"'label_smoothing_factor' and 'stage'.*not to stage 'dpo'"),
    ({"use_dft_loss": True}, r"'label_smoothing_factor' and 'use_dft_loss'"),
    ({"label_smoothing_factor": 1.0}, r"'label_smoothing_factor': 1.0 is out of range"),
])
def test_where_it_does_not_apply_it_is_refused_naming_the_keys(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "label_smoothing_factor": EPS, **keys})
