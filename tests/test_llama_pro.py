"""LLaMA-Pro: ``lmf expand`` inserts identity blocks (the expanded model computes what the original did), and
``use_llama_pro`` trains exactly those blocks (freeze, LoRA), LF's example YAML unchanged but for the model."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
DATA = os.path.join(REPO_ROOT, "examples", "data")
LF_EXAMPLE = os.path.join(REPO_ROOT, "..", "shared", "lf-examples", "extras", "llama_pro", "llama3_freeze_sft.yaml")
IDS = torch.randint(0, 2000, (2, 20), generator=torch.Generator().manual_seed(0))


def _logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()(input_ids=IDS).logits


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    from lmf.expand import expand_model

    return expand_model(DEMO_MODEL, str(tmp_path_factory.mktemp("pro") / "tiny-pro"), num_expand=2)


def test_expansion_inserts_identity_blocks(expanded):
    with open(os.path.join(expanded, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4
    torch.testing.assert_close(_logits(expanded), _logits(DEMO_MODEL), atol=1e-5, rtol=1e-5)
    original, new = _weights(DEMO_MODEL), _weights(expanded)
    for copy, source in ((1, 0), (3, 1)):
        for key, value in original.items():
            if f"layers.{source}." not in key:
                continue
            mine = new[key.replace(f"layers.{source}.", f"layers.{copy}.")]
            if "o_proj" in key or "down_proj" in key:
                assert not mine.any(), key
            else:
                assert torch.equal(mine, value), key


def test_expand_refuses_what_it_cannot_do(tmp_path, expanded):
    from lmf.expand import expand_model

    with pytest.raises(ConfigError, match="not empty"):
        expand_model(DEMO_MODEL, expanded, num_expand=2)
    with pytest.raises(ConfigError, match="divide the model's 2 layers"):
        expand_model(DEMO_MODEL, str(tmp_path / "x"), num_expand=3)
    assert not (tmp_path / "x").exists()


def _train(out, model, **overrides):
    from lmf.train.workflow import run_training

    raw = dict(model_name_or_path=model, dataset_dir=DATA, dataset="identity", template="qwen", cutoff_len=96,
               max_samples=16, output_dir=str(out), max_steps=6, logging_steps=1, per_device_train_batch_size=4,
               learning_rate=1e-3, save_steps=100, disable_tqdm=True, use_llama_pro=True,
               preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "c"))
    raw.update(overrides)
    run_training(build_config(raw))


def test_freeze_training_changes_only_the_expanded_blocks(tmp_path, expanded):
    out = tmp_path / "freeze"
    _train(out, expanded, finetuning_type="freeze", freeze_trainable_layers=2)
    base, trained = _weights(expanded), _weights(out)
    changed = {k for k in trained if not torch.equal(trained[k], base[k])}
    layers = {k.split(".")[2] for k in changed}
    assert changed and layers == {"1", "3"}, sorted(changed)


def test_lora_adapts_only_the_expanded_blocks(tmp_path, expanded):
    out = tmp_path / "lora"
    _train(out, expanded, finetuning_type="lora", lora_target="all", freeze_trainable_layers=2)
    with open(out / "adapter_config.json", encoding="utf-8") as fh:
        targets = json.load(fh)["target_modules"]
    assert targets and {t.split(".")[2] for t in targets} == {"1", "3"}, targets


def test_llamafactory_example_and_the_cli(tmp_path):
    from lmf.testing.tiny import build_tiny_model
    from transformers import AutoTokenizer

    base = tmp_path / "tiny8"
    build_tiny_model(str(base), arch="qwen3", seed=0, tokenizer=AutoTokenizer.from_pretrained(DEMO_MODEL),
                     hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=128)
    pro = tmp_path / "tiny8-pro"
    from lmf.testing.cli import run_lmf

    proc = run_lmf("expand", "--model_name_or_path", str(base), "--output_dir", str(pro), "--num_expand", "8",
                   cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "use_llama_pro: true" in proc.stdout
    with open(LF_EXAMPLE, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    out = tmp_path / "out"
    raw.update(model_name_or_path=str(pro), output_dir=str(out), dataset_dir=DATA, max_samples=8, max_steps=2,
               cutoff_len=64, preprocessing_num_workers=1, bf16=False, disable_tqdm=True, save_steps=100,
               preprocessing_cache_dir=str(tmp_path / "c"))
    from lmf.train.workflow import run_training

    run_training(build_config(raw))
    before, after = _weights(pro), _weights(out)
    layers = {k.split(".")[2] for k in after if k.startswith("model.layers.") and not torch.equal(after[k], before[k])}
    assert layers == {str(i) for i in range(1, 16, 2)}
    # llama3's stop words are not in the Qwen vocabulary: rows were added for them (the mean), the others untouched
    rows = before["model.embed_tokens.weight"].shape[0]
    assert after["model.embed_tokens.weight"].shape[0] > rows
    assert torch.equal(after["model.embed_tokens.weight"][:rows], before["model.embed_tokens.weight"])


def test_use_llama_pro_refusals():
    with pytest.raises(ConfigError, match="use_llama_pro' needs finetuning_type freeze"):
        build_config({"model_name_or_path": "m", "use_llama_pro": True, "finetuning_type": "full"})
