"""new_special_tokens_config and init_special_tokens (LLaMA-Factory main): the YAML's tokens are added as special
tokens, and the rows of added tokens start from the mean (noise_init), their descriptions (desc_init) or both."""

from __future__ import annotations

import math

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

TOKENS = {"<|start_svg|>": "the beginning of an image drawn as text", "<|end_svg|>": "the end of the image"}


@pytest.fixture
def tokens_yaml(tmp_path):
    import yaml

    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(TOKENS))
    return str(path)


def _load(tiny_model_dir, **keys):
    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config({"model_name_or_path": tiny_model_dir, "resize_vocab": True, **keys})
    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, load_model(cfg, tokenizer, is_trainable=False)


def test_desc_init_starts_each_token_at_the_mean_of_its_description(tiny_model_dir, tokens_yaml):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer, model = _load(tiny_model_dir, new_special_tokens_config=tokens_yaml, init_special_tokens="desc_init",
                             add_special_tokens="<ignored>")  # the config's tokens take its place
    assert {tokenizer.convert_tokens_to_ids(t) for t in TOKENS} == {len(tokenizer) - 2, len(tokenizer) - 1}
    assert "<ignored>" not in tokenizer.get_vocab()
    for token, text in TOKENS.items():
        row = tokenizer.convert_tokens_to_ids(token)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for got, old in ((model.get_input_embeddings().weight, base.get_input_embeddings().weight),
                         (model.get_output_embeddings().weight, base.get_output_embeddings().weight)):
            torch.testing.assert_close(got[row], old[ids].mean(0))
    n = base.get_input_embeddings().weight.shape[0]
    torch.testing.assert_close(model.get_input_embeddings().weight[:n], base.get_input_embeddings().weight)


def test_noise_init_is_the_mean_plus_noise_of_std_one_over_sqrt_hidden(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    torch.manual_seed(0)
    tokenizer, model = _load(tiny_model_dir, add_special_tokens=",".join(f"<t{i}>" for i in range(64)))
    rows = [tokenizer.convert_tokens_to_ids(f"<t{i}>") for i in range(64)]
    noise = model.get_input_embeddings().weight[rows] - base.mean(0)
    assert abs(noise.std().item() - 1 / math.sqrt(base.shape[1])) < 0.02 and abs(noise.mean().item()) < 0.02


@pytest.mark.parametrize("content, message", [
    (None, r"'new_special_tokens_config': cannot read"),
    ("- a\n- b\n", r"must map each new token to its description, got list"),
    ("a: [1\n", r"is not valid YAML"),
])
def test_a_bad_tokens_file_is_refused_naming_the_key_and_file(tiny_model_dir, tmp_path, content, message):
    path = tmp_path / "t.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        _load(tiny_model_dir, new_special_tokens_config=str(path))


def test_desc_init_without_descriptions_is_refused():
    with pytest.raises(ConfigError, match=r"'init_special_tokens': desc_init .* set new_special_tokens_config"):
        build_config({"model_name_or_path": "m", "init_special_tokens": "desc_init"})
