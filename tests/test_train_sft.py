"""SFT through the shared Trainer on the tiny model: loss goes down, outputs are loadable, grads are token-normalised."""

from __future__ import annotations

import json
import os

import pytest
import torch

from _train_helpers import make_config, tokenized_sft_rows, train_tiny, losses

torch.set_num_threads(1)


def _probe(tokenizer):
    ids = tokenizer("<|im_start|>user\nGive three tips for staying healthy.<|im_end|>\n")["input_ids"]
    return torch.tensor([ids])


@pytest.mark.parametrize("ftype,lr", [("lora", 1e-2), ("full", 2e-3), ("freeze", 5e-3)])
def test_sft_loss_decreases_and_outputs(tiny_model_dir, tmp_path, ftype, lr):
    cfg = make_config(tiny_model_dir, str(tmp_path / ftype), finetuning_type=ftype, learning_rate=lr, max_steps=8,
                      plot_loss=True, freeze_trainable_layers=1)
    trainer, state = train_tiny(cfg)
    curve = losses(state)
    assert len(curve) == 8
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2 - 0.05, curve
    out = tmp_path / ftype
    saved = json.loads((out / "trainer_state.json").read_text())
    assert saved["global_step"] == 8 and saved["finished"] is True
    assert [h["loss"] for h in saved["log_history"]] == curve
    assert (out / "training_loss.png").stat().st_size > 1000
    assert (out / "tokenizer_config.json").is_file()
    if ftype == "lora":
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert not (out / "model.safetensors").exists()
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # checkpoint at the end, complete, no temp dirs left behind
    assert (out / "checkpoint-8" / "optimizer.pt").is_file()
    assert (out / "checkpoint-8" / "rng_state_0.pth").is_file()
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_freeze_trains_only_last_layers(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, str(tmp_path), finetuning_type="freeze", freeze_trainable_layers=1, max_steps=2)
    before = {}
    from safetensors.torch import load_file

    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    train_tiny(cfg)
    after = load_file(str(tmp_path / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layers.1." in k for k in changed), sorted(changed)


def test_lora_adapter_reloads_with_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmf.model.loader import load_model

    out = str(tmp_path / "lora")
    cfg = make_config(tiny_model_dir, out, max_steps=4, learning_rate=1e-2, additional_target=None)
    trainer, _ = train_tiny(cfg)
    x = _probe(trainer.tokenizer)
    trainer.model.eval()
    with torch.no_grad():
        in_memory = trainer.model(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        base_logits = base(input_ids=x).logits
        reloaded = PeftModel.from_pretrained(base, out).eval()
        peft_logits = reloaded(input_ids=x).logits
    assert not torch.allclose(in_memory, base_logits, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(peft_logits, in_memory, atol=1e-5, rtol=1e-5)
    cfg_inf = make_config(tiny_model_dir, out, adapter_name_or_path=out)
    merged = load_model(cfg_inf, trainer.tokenizer, is_trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, in_memory, atol=1e-4, rtol=1e-4)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert "lm_head" not in config["target_modules"] and "q_proj" in config["target_modules"]


def test_full_model_reloads_with_same_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "full")
    trainer, _ = train_tiny(make_config(tiny_model_dir, out, finetuning_type="full", max_steps=3, learning_rate=1e-3))
    x = _probe(trainer.tokenizer)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def _weights_after_one_step(model_dir, out, rows, **kw):
    trainer, state = train_tiny(make_config(model_dir, out, finetuning_type="full", max_steps=1, max_grad_norm=0.0,
                                            lr_scheduler_type="constant", learning_rate=1e-3, optim="sgd",
                                            disable_shuffling=True, **kw), rows=rows)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, losses(state)[0]


def test_gradient_accumulation_averages_over_tokens(tiny_model_dir, tmp_path):
    """bs=4 x ga=1 and bs=1 x ga=4 give the same step when micro-batches hold different token counts."""
    from lmf.model.loader import load_tokenizer
    from lmf.config.parser import build_config

    tok = load_tokenizer(build_config({"model_name_or_path": tiny_model_dir}).model)
    rows = tokenized_sft_rows(tok, n=4)
    counts = [sum(l != -100 for l in r["labels"]) for r in rows]
    assert len(set(counts)) > 1  # uneven: a mean of per-micro-batch means would differ
    w1, loss1 = _weights_after_one_step(tiny_model_dir, str(tmp_path / "a"), rows, per_device_train_batch_size=4,
                                        gradient_accumulation_steps=1)
    w2, loss2 = _weights_after_one_step(tiny_model_dir, str(tmp_path / "b"), rows, per_device_train_batch_size=1,
                                        gradient_accumulation_steps=4)
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=2e-6, rtol=1e-5)


def test_seed_determinism(tiny_model_dir, tmp_path):
    _, a = train_tiny(make_config(tiny_model_dir, str(tmp_path / "a"), max_steps=3, lora_dropout=0.1))
    _, b = train_tiny(make_config(tiny_model_dir, str(tmp_path / "b"), max_steps=3, lora_dropout=0.1))
    _, c = train_tiny(make_config(tiny_model_dir, str(tmp_path / "c"), max_steps=3, lora_dropout=0.1, seed=7))
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


def test_one_epoch_trains_each_sample_once(tiny_model_dir, tmp_path):
    """7 micro-batches per epoch with accumulation 2: 4 steps, the last one shorter; never into epoch 2."""
    from lmf.model.loader import load_tokenizer

    cfg = make_config(tiny_model_dir, str(tmp_path / "out"), max_steps=-1, num_train_epochs=1.0,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, save_strategy="no")
    rows = tokenized_sft_rows(load_tokenizer(cfg.model), n=13)  # ceil(13 / 2) = 7 micro-batches
    _, state = train_tiny(cfg, rows=rows)
    assert state.global_step == 4
    assert state.epoch == 1.0
    assert state.tokens_seen == sum(len(r["input_ids"]) for r in rows)
