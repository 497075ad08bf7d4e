"""shift_attn (LongLoRA's S²-Attn): the grouped attention equals dense attention under the group masks it stands for
(no look at a later position, padding kept), the loaded model groups in training and attends fully in evaluation,
training with it learns and saves a servable model, and what it does not combine with is refused naming the keys."""

from __future__ import annotations

import json
import logging
import os

import pytest

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")  # pretrained: its loss falls within a few steps
DEMO_DATA = os.path.join(REPO_ROOT, "examples", "data")


def _dense_reference(q, k, v, mask=None):
    """Attention over the full row with S²-Attn's groups as a mask: heads [0, H/2) attend within ``p // g``, heads
    [H/2, H) within ``(p + g/2) // g`` (no wrap-around), both causal and inside ``mask``."""
    import torch
    import torch.nn.functional as F

    from lmf.model.shift_attention import group_size

    heads, length = q.shape[1], q.shape[2]
    g = group_size(length)
    pos = torch.arange(length)
    causal = pos[:, None] >= pos[None, :]
    plain = (pos[:, None] // g) == (pos[None, :] // g)
    shifted_group = (pos + g // 2) // g
    shifted = shifted_group[:, None] == shifted_group[None, :]
    allowed = torch.stack([causal & (plain if h < heads // 2 else shifted) for h in range(heads)])[None]
    if mask is not None:
        allowed = allowed & mask
    return F.scaled_dot_product_attention(q, k.repeat_interleave(heads // k.shape[1], 1),
                                          v.repeat_interleave(heads // v.shape[1], 1),
                                          attn_mask=allowed | torch.eye(length, dtype=torch.bool))


@pytest.mark.parametrize("length", [32, 40, 10, 7, 2])
def test_grouped_attention_equals_dense_attention_under_the_group_masks(length):
    import torch

    from lmf.model.shift_attention import grouped_attention

    gen = torch.Generator().manual_seed(length)
    q = torch.randn(2, 4, length, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, length, 8, dtype=torch.float64, generator=gen) for _ in range(2))  # GQA: 2 kv heads
    torch.testing.assert_close(grouped_attention(q, k, v), _dense_reference(q, k, v))
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, length - min(3, length - 1):] = False  # right padding in the second row
    mask = (torch.ones(length, length, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]
    got = grouped_attention(q, k, v, mask)
    assert torch.isfinite(got).all()  # a group of padding alone still attends (to itself)
    real = keep[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], _dense_reference(q, k, v, mask)[real])
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(grouped_attention(q, k, v, additive)[real], got[real])


def test_no_position_sees_a_later_one_and_groups_stay_local():
    """LongLoRA rolls the row, so its first tokens share a group with its last ones; here nothing wraps around."""
    import torch

    from lmf.model.shift_attention import grouped_attention

    length = 32  # groups of 8: heads 0 over [0, 8), [8, 16) ..., head 1 over [0, 4), [4, 12), ... [28, 32)
    q, k, v = (torch.randn(1, 2, length, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = grouped_attention(q, k, v)
    for t, head, reach in [(0, 1, range(0, 1)), (3, 1, range(0, 4)), (5, 1, range(4, 6)), (5, 0, range(0, 6)),
                           (11, 1, range(4, 12)), (12, 1, range(12, 13)), (30, 1, range(28, 31)), (30, 0, range(24, 31))]:
        grads = torch.autograd.grad(out[0, head, t].sum(), (k, v), retain_graph=True)
        touched = {p for grad in grads for p in grad[0, head].abs().sum(-1).nonzero().flatten().tolist()}
        assert touched == set(reach), (t, head, sorted(touched))


def test_the_model_groups_in_training_and_attends_fully_in_evaluation(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from lmf.model.loader import load_model, load_tokenizer
    from lmf.model.shift_attention import IMPLEMENTATION

    cfg = build_config({"model_name_or_path": tiny_llama_dir, "template": "qwen", "shift_attn": True,
                        "finetuning_type": "full", "disable_gradient_checkpointing": True})
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    assert model.config._attn_implementation == IMPLEMENTATION
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa", dtype=torch.float32)
    ids = torch.randint(0, plain.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval(), plain.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        model.train()
        grouped = model(input_ids=ids).logits
    torch.testing.assert_close(grouped[:, :6], plain(input_ids=ids).logits[:, :6])  # the first half group: all heads
    assert not torch.allclose(grouped[:, 24:], plain(input_ids=ids).logits[:, 24:], atol=1e-4)  # later: grouped


def test_lora_and_full_training_learn_and_save_a_model_transformers_serves(tmp_path, caplog):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmf.train.workflow import run_training

    for method in ("lora", "full"):
        out = tmp_path / method
        cfg = build_config(dict(
            model_name_or_path=DEMO_MODEL, dataset_dir=DEMO_DATA, dataset="alpaca_en_demo", template="qwen",
            cutoff_len=96, max_samples=8, output_dir=str(out), num_train_epochs=6, per_device_train_batch_size=4,
            finetuning_type=method, learning_rate=5e-3 if method == "lora" else 1e-3, save_strategy="no",
            disable_tqdm=True, logging_steps=1, shift_attn=True, preprocessing_cache_dir=str(tmp_path / "cache")))
        with caplog.at_level(logging.INFO, logger="lmf"):
            run_training(cfg)
        assert "shift_attn: S²-Attn in training" in caplog.text
        history = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
                   if "loss" in h]
        assert sum(history[-2:]) < sum(history[:2]) - 0.6, history  # the last epoch against the first
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert "lmf_shift_short" not in json.dumps(saved)  # served (vLLM, transformers) with their own attention
    assert AutoConfig.from_pretrained(tmp_path / "full")._attn_implementation != "lmf_shift_short"
    AutoModelForCausalLM.from_pretrained(tmp_path / "full")


def test_what_shift_attn_does_not_combine_with_is_refused_naming_the_keys(tmp_path):
    from lmf.model.shift_attention import unsupported_reason
    from lmf.testing.tiny import build_config as tiny_config

    base = {"model_name_or_path": "m", "shift_attn": True}
    with pytest.raises(ConfigError, match=r"'shift_attn' and 'flash_attn: eager' do not combine"):
        build_config({**base, "flash_attn": "eager"})
    with pytest.raises(ConfigError, match=r"'shift_attn' and 'packing' / 'neat_packing' do not combine"):
        build_config({**base, "stage": "pt"})  # pt packs by default
    with pytest.raises(ConfigError, match=r"'shift_attn' and 'packing'"):
        build_config({**base, "neat_packing": True, "packing": True})
    assert "model type 'gpt2'" in unsupported_reason({"model_type": "gpt2"})
    assert "3 attention heads" in unsupported_reason(tiny_config("llama", 64, hidden_size=48, num_heads=3,
                                                                 num_kv_heads=1).to_dict())
    assert "sliding-window layers" in unsupported_reason(
        tiny_config("qwen3", 64, layer_types=["full_attention", "sliding_attention"]).to_dict())
    assert unsupported_reason(tiny_config("qwen3", 64).to_dict()) is None


def test_outside_training_shift_attn_says_the_model_attends_over_the_whole_row(tiny_llama_dir, caplog):
    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config({"model_name_or_path": tiny_llama_dir, "template": "qwen", "shift_attn": True})
    with caplog.at_level(logging.INFO, logger="lmf"):
        model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=False)
    assert model.config._attn_implementation == "sdpa"
    assert "shift_attn applies to training" in caplog.text
