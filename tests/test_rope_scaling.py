"""rope_scaling: LLaMA-Factory's factor rule, the model equal to transformers' own rope-scaled model past the native
length, the trained model saved with its scaling, and refusals that name the key."""

from __future__ import annotations

import json
import logging

import pytest

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

NATIVE = 32  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> str:
    """A tiny Llama with 32 native positions (fast to go past)."""
    from lmf.testing.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("short-llama")), arch="llama", max_position_embeddings=NATIVE)


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("kind, target, factor, extra", [
    ("linear", 100, 4.0, {}),
    ("dynamic", 64, 2.0, {"original_max_position_embeddings": NATIVE}),
    ("yarn", 33, 2.0, {"original_max_position_embeddings": NATIVE}),
    ("llama3", 96, 3.0, {"original_max_position_embeddings": NATIVE, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("linear", None, 2.0, {}),  # inference without model_max_length: LLaMA-Factory's factor 2
])
def test_factor_and_parameters_follow_llamafactory(short_model, kind, target, factor, extra):
    from lmf.model.rope import configure_rope

    config = _config(short_model)
    theta = config.rope_parameters["rope_theta"]
    assert configure_rope(config, kind, target, short_model)
    assert config.rope_parameters == {"rope_type": kind, "factor": factor, "rope_theta": theta, **extra}
    assert config.max_position_embeddings == int(NATIVE * factor)


def test_an_already_scaled_model_scales_from_its_original_length(short_model):
    from lmf.model.rope import configure_rope

    config = _config(short_model)
    configure_rope(config, "yarn", 64, short_model)  # 64 positions, original 32
    configure_rope(config, "linear", 100, short_model)  # LLaMA-Factory: from original_max_position_embeddings
    assert config.rope_parameters["factor"] == 4.0 and config.max_position_embeddings == 128
    assert "original_max_position_embeddings" not in config.rope_parameters  # the yarn keys are replaced


def test_a_length_within_the_native_one_is_left_unscaled_and_logged(short_model, caplog):
    from lmf.model.rope import configure_rope

    config = _config(short_model)
    before = dict(config.rope_parameters)
    with caplog.at_level(logging.INFO, logger="lmf"):
        assert not configure_rope(config, "linear", NATIVE, short_model)
    assert config.rope_parameters == before and config.max_position_embeddings == NATIVE
    assert "no scaling applied" in caplog.text


def test_the_loaded_model_equals_transformers_rope_scaled_model_past_the_native_length(short_model):
    import torch
    from transformers import AutoModelForCausalLM

    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config({"model_name_or_path": short_model, "rope_scaling": "linear", "model_max_length": 3 * NATIVE,
                        "template": "qwen"})
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=False).eval()
    assert model.config.rope_parameters["factor"] == 3.0 and model.config.max_position_embeddings == 3 * NATIVE
    theta = _config(short_model).rope_parameters["rope_theta"]
    reference = AutoModelForCausalLM.from_pretrained(
        short_model, rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": theta}).eval()
    plain = AutoModelForCausalLM.from_pretrained(short_model).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * NATIVE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, unscaled = (m(input_ids=ids).logits for m in (model, reference, plain))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[0, NATIVE:], unscaled[0, NATIVE:], atol=1e-4)  # the scaling is what changed them


def test_full_training_past_the_native_length_saves_the_scaled_config(short_model, demo_data_dir, tmp_path, caplog):
    from lmf.train.workflow import run_training

    out = tmp_path / "out"
    cfg = build_config(dict(
        model_name_or_path=short_model, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
        cutoff_len=80, max_samples=8, output_dir=str(out), max_steps=2, per_device_train_batch_size=4,
        finetuning_type="full", learning_rate=1e-3, save_strategy="no", disable_tqdm=True, logging_steps=1,
        rope_scaling="dynamic", model_max_length=4096,  # training: cutoff_len wins, as in LLaMA-Factory
        preprocessing_cache_dir=str(tmp_path / "cache")))
    with caplog.at_level(logging.INFO, logger="lmf"):
        run_training(cfg)
    assert "rope_scaling=dynamic: factor 3, max positions 32 -> 96" in caplog.text
    saved = json.loads((out / "config.json").read_text())
    params = saved.get("rope_parameters") or saved.get("rope_scaling")
    assert params["rope_type"] == "dynamic" and params["factor"] == 3.0
    assert params["original_max_position_embeddings"] == NATIVE and saved["max_position_embeddings"] == 96
    reloaded = _config(str(out))  # what transformers (and vLLM, which reads it) serve the output with
    assert reloaded.rope_parameters["factor"] == 3.0 and reloaded.max_position_embeddings == 96
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(h["loss"] == h["loss"] and h["loss"] < 20 for h in history if "loss" in h)


def test_bad_values_and_models_without_rope_are_refused_naming_the_key(tmp_path):
    from transformers import GPT2Config

    from lmf.model.rope import configure_rope

    with pytest.raises(ConfigError, match=r"'rope_scaling'.*'ntk'.*linear, dynamic, yarn, llama3"):
        build_config({"model_name_or_path": "m", "rope_scaling": "ntk"})
    with pytest.raises(ConfigError, match=r"'rope_scaling': the model at model_name_or_path='gpt2-dir' has no RoPE"):
        configure_rope(GPT2Config(n_layer=1), "linear", 4096, "gpt2-dir")
