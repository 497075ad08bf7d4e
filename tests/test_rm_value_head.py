"""Value head: scoring at the last non-pad token, save/reload round trip (plain and LoRA)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmf.extras.errors import LmfError
from lmf.model.value_head import (
    VALUE_HEAD_CONFIG,
    VALUE_HEAD_WEIGHTS,
    add_value_head,
    last_token_index,
    load_reward_model,
    load_value_head,
    save_value_head,
    score,
    strip_value_head,
    token_values,
)

torch.set_num_threads(1)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 3, 0]


def test_score_is_value_at_last_non_pad_token_and_ignores_padding(tiny_model_dir):
    model = _load(tiny_model_dir).eval()
    head = add_value_head(model, seed=0)
    assert head.summary.weight.shape == (1, model.config.hidden_size)
    ids, mask = _batch()
    with torch.no_grad():
        values = token_values(model, ids, mask)
        scores = score(model, ids, mask)
        alone = score(model, ids[:1, :4], mask[:1, :4])
    assert values.shape == ids.shape
    assert scores[0].item() == pytest.approx(values[0, 3].item(), abs=1e-6)
    assert scores[1].item() == pytest.approx(values[1, 5].item(), abs=1e-6)
    assert scores[0].item() == pytest.approx(alone[0].item(), abs=1e-5)  # right padding changes nothing
    # gradients reach the head
    score(model, ids, mask).sum().backward()
    assert head.summary.weight.grad is not None and head.summary.weight.grad.abs().sum() > 0


def test_save_and_reload_scores_identically(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir).eval()
    add_value_head(model, seed=1)
    with torch.no_grad():
        model.v_head.summary.bias.fill_(0.25)
    ids, mask = _batch()
    with torch.no_grad():
        before = score(model, ids, mask)
    save_value_head(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([VALUE_HEAD_WEIGHTS, VALUE_HEAD_CONFIG])
    cfg = json.loads((tmp_path / VALUE_HEAD_CONFIG).read_text())
    assert cfg["hidden_size"] == model.config.hidden_size
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / VALUE_HEAD_WEIGHTS))) == {"v_head.summary.weight", "v_head.summary.bias"}

    fresh = _load(tiny_model_dir).eval()
    load_value_head(fresh, str(tmp_path))
    with torch.no_grad():
        after = score(fresh, ids, mask)
    assert torch.equal(before, after)


def test_lora_reward_model_round_trip(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    add_value_head(model, seed=2)
    model.eval()
    ids, mask = _batch()
    with torch.no_grad():
        before = score(model, ids, mask)
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    save_value_head(model, out)
    # the adapter file holds only LoRA weights; the head lives in its own file
    from safetensors.torch import load_file

    assert not any("v_head" in k for k in load_file(os.path.join(out, "adapter_model.safetensors")))
    reloaded = load_reward_model(tiny_model_dir, out, dtype=torch.float32)
    with torch.no_grad():
        after = score(reloaded, ids, mask)
    assert torch.allclose(before, after, atol=1e-6)


def test_strip_value_head_and_errors(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir)
    add_value_head(model)
    sd = model.state_dict()
    assert any(k.startswith("v_head.") for k in sd)
    assert not any("v_head." in k for k in strip_value_head(sd))
    with pytest.raises(LmfError, match="value_head.safetensors"):
        load_value_head(_load(tiny_model_dir), str(tmp_path))
    with pytest.raises(LmfError, match="no value head"):
        score(_load(tiny_model_dir), *_batch())
