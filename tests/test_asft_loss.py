"""use_asft_loss (LLaMA-Factory main): the DFT loss plus asft_alpha x KL(reference || policy) at each label token;
chunked and plain paths equal LLaMA-Factory's formula on full logits, values and gradients; trained end to end with
a LoRA policy (the reference: its adapters disabled) and with full tuning (a frozen copy)."""

from __future__ import annotations

import json

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError


def _llamafactory_asft(logits, ref_logits, labels, alpha):
    """LLaMA-Factory main's asft_loss_func (trainer_utils.py) on [B, T, V] logits, written out."""
    F = torch.nn.functional
    vocab = logits.shape[-1]
    shift_logits, shift_ref = logits[:, :-1].reshape(-1, vocab).float(), ref_logits[:, :-1].reshape(-1, vocab)
    shift_labels = labels[:, 1:].reshape(-1)
    valid = shift_labels != -100
    ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")[valid]
    dft = (ce * torch.exp(-ce).detach()).mean()
    kl = F.kl_div(F.log_softmax(shift_logits, dim=-1), F.softmax(shift_ref, dim=-1), reduction="none").sum(-1)
    mask = valid.float()
    return dft + alpha * (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("chunk_size, alpha", [(None, 0.1), (3, 0.1), (4, 0.5)])
def test_asft_equals_llamafactorys_formula_in_value_and_gradients(chunk_size, alpha):
    from lmf.loss.dft import asft_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    ref_hidden = torch.randn(2, 9, 16, generator=g)
    head, ref_head = torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(16, 64, bias=False)
    labels = torch.randint(0, 64, (2, 9), generator=g)
    labels[1, :4] = -100
    loss_sum, n = asft_loss(hidden, head, labels, ref_hidden, ref_head, alpha, chunk_size)
    (loss_sum / n).backward()
    got, got_head = hidden.grad.clone(), head.weight.grad.clone()
    assert ref_head.weight.grad is None  # the reference stays frozen
    hidden.grad = head.weight.grad = None
    want = _llamafactory_asft(head(hidden), ref_head(ref_hidden), labels, alpha)
    want.backward()
    torch.testing.assert_close(loss_sum / n, want)
    torch.testing.assert_close(got, hidden.grad)
    torch.testing.assert_close(got_head, head.weight.grad)


def test_the_kl_term_vanishes_against_itself_and_is_hand_computable():
    from lmf.loss.dft import asft_loss, dft_loss

    hidden = torch.randn(1, 4, 8)
    head = torch.nn.Linear(8, 5, bias=False)
    labels = torch.tensor([[-100, 1, 2, 3]])
    same, n = asft_loss(hidden, head, labels, hidden, head, alpha=3.0)
    torch.testing.assert_close(same, dft_loss(hidden, head, labels)[0])  # KL(p || p) = 0
    # one label row, a uniform reference: KL(u || p) = -log 5 - mean(log p)
    one = torch.tensor([[-100, 2]])
    h = torch.randn(1, 2, 8)
    zero_head = torch.nn.Linear(8, 5, bias=False)
    torch.nn.init.zeros_(zero_head.weight)
    total, _ = asft_loss(h, head, one, h, zero_head, alpha=1.0)
    logp = head(h[0, 0]).log_softmax(-1)
    want = -logp[2].exp().detach() * logp[2] + (-torch.log(torch.tensor(5.0)) - logp.mean())
    torch.testing.assert_close(total, want)


def _train(tiny_model_dir, demo_data_dir, tmp_path, name, **keys):
    from lmf.train.workflow import run_training
    from tests.conftest import log_records

    out = tmp_path / name
    with log_records("lmf") as records:
        run_training(build_config(dict(
            model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
            cutoff_len=64, max_samples=16, output_dir=str(out), max_steps=4, per_device_train_batch_size=8,
            learning_rate=5e-2, save_strategy="no", disable_tqdm=True, logging_steps=1,
            preprocessing_cache_dir=str(tmp_path / "cache"), **keys)))
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    return losses, " | ".join(r.getMessage() for r in records)


@pytest.mark.parametrize("method, says", [("lora", "the base model with the LoRA adapters disabled"),
                                          ("full", "loading the frozen reference model")])
def test_asft_trains_against_its_reference(tiny_model_dir, demo_data_dir, tmp_path, method, says):
    """At the first step the policy is the reference (KL 0): the loss is DFT's; then the KL anchor adds to it."""
    asft, log = _train(tiny_model_dir, demo_data_dir, tmp_path, "asft", finetuning_type=method, use_asft_loss=True,
                       asft_alpha=10.0)
    dft, _ = _train(tiny_model_dir, demo_data_dir, tmp_path, "dft", finetuning_type=method, use_dft_loss=True)
    assert says in log and len(asft) == len(dft) == 4
    assert asft[0] == pytest.approx(dft[0], rel=1e-5)
    assert all(a > d for a, d in zip(asft[1:], dft[1:]))  # the policy has moved away from the reference


@pytest.mark.parametrize("keys, message", [
    ({"use_dft_loss": True}, r"'use_dft_loss' and 'use_asft_loss'"),
    ({"stage": "dpo"}, r"'use_asft_loss' is an SFT loss; it does not apply to stage dpo"),
    ({"label_smoothing_factor": 0.1}, r"'label_smoothing_factor' and 'use_asft_loss'"),
    ({"pissa_init": True}, r"'pissa_init' with use_asft_loss"),
])
def test_combinations_are_refused_naming_both_keys(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "use_asft_loss": True, **keys})


def test_a_separate_reference_under_fsdp_is_refused_before_it_loads(tiny_model_dir):
    """Full tuning has no adapters to switch off: its reference is a second model, which FSDP does not shard here."""
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmf.train.sft import build_objective

    cfg = build_config({"model_name_or_path": tiny_model_dir, "use_asft_loss": True, "finetuning_type": "full",
                        "template": "qwen"})
    inputs = types.SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                   tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), pad_to_multiple_of=None,
                                   plan=types.SimpleNamespace(mode="fsdp"))
    with pytest.raises(ConfigError, match=r"'use_asft_loss' with a separate reference model .* under FSDP"):
        build_objective(cfg, inputs)
