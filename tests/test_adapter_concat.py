"""Several LoRA adapters stacked into one (what vLLM needs for ``adapter_name_or_path: a,b``): the stacked adapter
gives the model that merging the adapters one after the other gives; adapters that are not plain LoRA are refused."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import REPO_ROOT

BASE = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
IDS = torch.tensor([[5, 17, 300, 41, 99, 1000, 7, 256]])


def _random_adapter(path, seed: int, **lora) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE),
                           LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora))
    model.save_pretrained(str(path))
    return str(path)


def _logits(adapters: list[str]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE)
    for path in adapters:  # merged one after the other: the huggingface backend's inference model
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_stacked_adapter_equals_merging_them_in_turn(tmp_path):
    from lmf.model.adapter_concat import combined_adapter, lora_rank

    a = _random_adapter(tmp_path / "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = _random_adapter(tmp_path / "b", 1, r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"])
    combined, tmp = combined_adapter([a, b], str(tmp_path))
    assert lora_rank(combined) == 12
    expected = _logits([a, b])
    assert not torch.allclose(expected, _logits([a]), atol=1e-3)  # both adapters change the model
    assert torch.allclose(_logits([combined]), expected, atol=1e-5)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), combined)  # as served, unmerged
    with torch.no_grad():
        assert torch.allclose(unmerged(input_ids=IDS).logits, expected, atol=1e-5)
    assert combined_adapter([a], str(tmp_path)) == (a, None)


def test_adapters_that_are_not_plain_lora_are_refused(tmp_path):
    from lmf.extras.errors import ConfigError
    from lmf.model.adapter_concat import combined_adapter

    a = _random_adapter(tmp_path / "a", 0, r=4, target_modules=["q_proj"])
    dora = _random_adapter(tmp_path / "dora", 1, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ConfigError, match=r"DoRA .*lmf export"):
        combined_adapter([a, dora], str(tmp_path))
    saved = _random_adapter(tmp_path / "saved", 2, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        combined_adapter([a, saved], str(tmp_path))
    biased = _random_adapter(tmp_path / "biased", 3, r=4, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(ConfigError, match="lora_bias|other than lora_A"):
        combined_adapter([a, biased], str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("lmf-adapters-")]  # nothing left behind

