"""SFT extras of LLaMA-Factory: the DFT loss (``use_dft_loss``) and NEFTune (``neftune_noise_alpha``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
DATA = os.path.join(REPO_ROOT, "examples", "data")


def _raw(out, **overrides) -> dict:
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=DATA, dataset="identity", template="qwen", cutoff_len=128,
               max_samples=16, output_dir=str(out), max_steps=8, logging_steps=1, per_device_train_batch_size=8,
               gradient_accumulation_steps=2, learning_rate=1e-3, finetuning_type="full", save_steps=100,
               disable_tqdm=True, preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "c"))
    raw.update(overrides)
    return raw


def _losses(out) -> list[float]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_dft_loss_is_probability_weighted_cross_entropy(chunk_size):
    from lmf.loss.dft import dft_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [-100, -100, 1, 2, 10]])
    loss_sum, n = dft_loss(hidden, head, labels, chunk_size)
    # by hand: LLaMA-Factory's _dft_cross_entropy, as a sum
    logits = head(hidden[:, :-1]).reshape(-1, 11)
    targets = labels[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")[targets != -100]
    expected = (ce * torch.exp(-ce).detach()).sum()
    assert int(n) == 6 and float(loss_sum.detach()) == pytest.approx(float(expected), rel=1e-5)
    grad, = torch.autograd.grad(loss_sum, hidden)
    expected_grad, = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def _mean_ce(model, rows) -> float:
    from _train_helpers import PadCollator

    batch = PadCollator(0)(rows)
    with torch.no_grad():
        return float(model(**batch).loss)


def test_dft_sft_raises_label_likelihood_and_logs_the_dft_loss(tmp_path):
    from _train_helpers import losses, make_config, tokenized_sft_rows, train_tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = tokenized_sft_rows(AutoTokenizer.from_pretrained(DEMO_MODEL), n=8)
    before = _mean_ce(AutoModelForCausalLM.from_pretrained(DEMO_MODEL), rows)
    cfg = make_config(DEMO_MODEL, str(tmp_path / "dft"), use_dft_loss=True, finetuning_type="full",
                      learning_rate=1e-3, max_steps=8, gradient_accumulation_steps=1)
    trainer, state = train_tiny(cfg, rows=rows)
    logged = losses(state)
    # -p log p per token is at most 1/e: the logged value is the DFT loss, not the cross-entropy (~11 here)
    assert all(0 < v <= 1 / 2.718281828 + 1e-4 for v in logged), logged
    trainer.model.eval()
    after = _mean_ce(trainer.model, rows)
    assert after < before - 0.08, (before, after)  # the method is for raising p(label): cross-entropy falls
    with pytest.raises(ConfigError, match="'use_dft_loss' is an SFT loss"):
        build_config(_raw(tmp_path / "x", use_dft_loss=True, stage="dpo", dataset="dpo_en_demo"))


def test_neftune_adds_bounded_noise_to_the_embeddings_only_while_training(tmp_path):
    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config(_raw(tmp_path / "o", neftune_noise_alpha=5.0))
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    ids = torch.randint(0, 100, (2, 16))
    embeddings = model.get_input_embeddings()
    clean = torch.nn.functional.embedding(ids, embeddings.weight)
    noisy = embeddings(ids)
    bound = 5.0 / (16 * noisy.size(-1)) ** 0.5
    delta = (noisy - clean).abs()
    assert 0.5 * bound < float(delta.max()) <= bound + 1e-6
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        build_config(_raw(tmp_path / "y", neftune_noise_alpha=-1.0))


def test_neftune_training_is_seeded_and_differs_from_plain(tmp_path):
    from lmf.train.workflow import run_training

    runs = {}
    for name, extra in (("plain", {}), ("a", {"neftune_noise_alpha": 5.0}), ("b", {"neftune_noise_alpha": 5.0})):
        run_training(build_config(_raw(tmp_path / name, max_steps=3, **extra)))
        runs[name] = _losses(tmp_path / name)
    assert runs["a"] == runs["b"]  # the noise comes from the seeded RNG
    assert runs["a"] != runs["plain"]


@pytest.mark.parametrize("example", ["dft/qwen2_full_sft.yaml", "loraplus/llama3_lora_sft.yaml"])
def test_llamafactory_extras_examples_train_unchanged_but_for_the_model(tmp_path, example):
    import yaml

    from lmf.train.workflow import run_training

    path = os.path.join(REPO_ROOT, "..", "shared", "lf-examples", "extras", example)
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    out = tmp_path / "out"
    raw.update(model_name_or_path=DEMO_MODEL, output_dir=str(out), dataset_dir=DATA, max_samples=8, max_steps=2,
               cutoff_len=64, preprocessing_num_workers=1, dataloader_num_workers=0, disable_tqdm=True,
               save_steps=100, logging_steps=1, plot_loss=False, preprocessing_cache_dir=str(tmp_path / "c"))
    run_training(build_config(raw))
    assert len(_losses(out)) == 2
