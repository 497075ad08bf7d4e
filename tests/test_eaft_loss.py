"""use_eaft_loss (LLaMA-Factory main): each label token's cross-entropy times (top-20 entropy / 3) ** eaft_alpha,
detached; the chunked and plain paths equal a direct computation on the full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError


def _reference(logits, labels, alpha):
    """The EAFT loss written out on ``[B, T, V]`` logits: mean over label tokens, as LLaMA-Factory reduces it."""
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    mask = shift_labels != -100
    ce = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="none")
    top = shift_logits[mask].detach().topk(20, dim=-1).values
    p = top.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    return (ce * (entropy / 3.0) ** alpha).sum() / mask.sum()


@pytest.mark.parametrize("chunk_size, alpha", [(None, 1.0), (3, 1.0), (4, 0.5)])
def test_eaft_equals_the_formula_in_value_and_gradients(chunk_size, alpha):
    from lmf.loss.dft import eaft_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 64, bias=False)
    labels = torch.randint(0, 64, (2, 9), generator=g)
    labels[1, :4] = -100
    loss_sum, n = eaft_loss(hidden, head, labels, chunk_size, alpha=alpha)
    (loss_sum / n).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    want = _reference(head(hidden), labels, alpha)
    want.backward()
    torch.testing.assert_close(loss_sum / n, want)
    torch.testing.assert_close(got, hidden.grad)


def test_eaft_trains_through_the_sft_recipe(tiny_model_dir, demo_data_dir, tmp_path):
    import json

    from lmf.train.workflow import run_training

    out = tmp_path / "out"
    run_training(build_config(dict(
        model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
        cutoff_len=64, max_samples=16, output_dir=str(out), max_steps=6, per_device_train_batch_size=8,
        learning_rate=5e-3, save_strategy="no", disable_tqdm=True, logging_steps=1, use_eaft_loss=True,
        eaft_alpha=1.0, preprocessing_cache_dir=str(tmp_path / "cache"))))
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.parametrize("keys, message", [
    ({"use_dft_loss": True}, r"'use_dft_loss' and 'use_eaft_loss'"),
    ({"stage": "dpo"}, r"'use_eaft_loss' is an SFT loss; it does not apply to stage dpo"),
    ({"label_smoothing_factor": 0.1}, r"'label_smoothing_factor' and 'use_eaft_loss'"),
])
def test_eaft_with_what_it_cannot_combine_is_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "use_eaft_loss": True, **keys})
