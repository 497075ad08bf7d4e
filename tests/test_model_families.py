"""Every decoder family LLaMA-Factory fine-tunes trains in lmf: tiny random-init models of each (LoRA and full,
loss finite and falling, saved, reloaded, generating), the attention each supports, LoRA never on routers, and
the MoE router auxiliary loss."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lmf.testing.architectures import ARCHITECTURES, tiny_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """name -> a saved tiny model of that family (with the bundled tokenizer), built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "examples", "tiny-qwen3"))
    root = tmp_path_factory.mktemp("families")
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            config = tiny_config(name, len(tokenizer))
            if config is None:
                pytest.skip(f"this transformers has no {ARCHITECTURES[name][0]}")
            config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, \
                tokenizer.pad_token_id, None
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            path = str(root / name)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[name] = path
        return built[name]

    return get


def _train(model_dir: str, out: str, ftype: str, cache: str, **extra) -> list[float]:
    from lmf.config.parser import build_config
    from lmf.train.workflow import run_training

    raw = dict(model_name_or_path=model_dir, dataset_dir=os.path.join(REPO_ROOT, "examples", "data"),
               dataset="identity", template="qwen", cutoff_len=64, max_samples=8, output_dir=out, max_steps=8,
               logging_steps=1, per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant",
               finetuning_type=ftype, save_steps=100, disable_tqdm=True, preprocessing_cache_dir=cache)
    raw.update(extra)
    run_training(build_config(raw))
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]


@pytest.mark.parametrize("ftype", ["lora", "full"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_family_trains_saves_reloads_and_generates(name, ftype, family_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = family_dir(name)
    out = str(tmp_path / "out")
    losses = _train(model_dir, out, ftype, str(tmp_path / "cache"))
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses  # one batch seen 8 times: the loss must fall
    if ftype == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)


def test_attention_follows_what_the_model_supports(family_dir):
    from lmf.model.loader import model_class_of, read_model_config, resolve_attn_implementation
    from lmf.extras.errors import ConfigError

    cpu = torch.device("cpu")
    for name, expected in (("gemma2", "eager"), ("gpt_oss", "eager"), ("qwen3", "sdpa")):
        path = family_dir(name)
        got = resolve_attn_implementation("auto", cpu, torch.float32, model_class_of(path), read_model_config(path))
        assert got == expected, name
    gemma2 = family_dir("gemma2")
    with pytest.raises(ConfigError, match="flash_attn"):
        resolve_attn_implementation("sdpa", cpu, torch.float32, model_class_of(gemma2), read_model_config(gemma2))


def test_softcapped_attention_is_never_sdpa_even_where_the_class_offers_it():
    """transformers 5.6-5.23 mark Gemma-2 sdpa-capable and drop its logit soft-cap there: the config decides."""
    from lmf.extras.errors import ConfigError
    from lmf.model.loader import resolve_attn_implementation

    class OffersSdpa:
        _supports_sdpa = True

    cpu = torch.device("cpu")
    capped = {"model_type": "gemma2", "attn_logit_softcapping": 50.0}
    assert resolve_attn_implementation("auto", cpu, torch.float32, OffersSdpa, capped) == "eager"
    assert resolve_attn_implementation("auto", cpu, torch.float32, OffersSdpa, {"attn_logit_softcapping": None}) == "sdpa"
    with pytest.raises(ConfigError, match="flash_attn"):
        resolve_attn_implementation("sdpa", cpu, torch.float32, OffersSdpa, capped)


def test_lora_all_leaves_routers_alone(family_dir):
    from transformers import AutoModelForCausalLM

    from lmf.model.adapter import find_all_linear_modules

    targets = find_all_linear_modules(AutoModelForCausalLM.from_pretrained(family_dir("llama4_text")))
    assert "router" not in targets and {"q_proj", "o_proj"} <= set(targets)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_moe_models_train_with_their_router_aux_loss(name, family_dir, tmp_path):
    from lmf.extras.errors import ConfigError
    from lmf.model.forward import decoder_of

    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "out")
    decoder = decoder_of(AutoModelForCausalLM.from_pretrained(family_dir(name)))
    if "router_logits" not in (getattr(type(decoder), "_can_record_outputs", None) or {}):  # deepseek_v3 before 5.19
        with pytest.raises(ConfigError, match="moe_aux_loss_coef.*router logits"):
            _train(family_dir(name), out, "lora", str(tmp_path / "cache"), moe_aux_loss_coef=0.01)
        return
    _train(family_dir(name), out, "lora", str(tmp_path / "cache"), moe_aux_loss_coef=0.01)
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        history = json.load(fh)["log_history"]
    aux = [h["aux_loss"] for h in history if "aux_loss" in h]
    assert len(aux) == 8 and all(0.5 < a < 4.5 for a in aux), aux  # top-k x balance, about k for uniform routing


def test_router_aux_loss_is_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from lmf.loss.moe import load_balancing_loss

    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(10, 4, generator=gen) for _ in range(3))
    assert float(load_balancing_loss(logits, 4, 2)) == pytest.approx(float(load_balancing_loss_func(logits, 4, 2)))


def test_moe_aux_loss_on_a_dense_model_is_an_error(family_dir, tmp_path):
    from lmf.extras.errors import ConfigError

    with pytest.raises(ConfigError, match="not a mixture-of-experts"):
        _train(family_dir("llama"), str(tmp_path / "out"), "lora", str(tmp_path / "cache"), moe_aux_loss_coef=0.01)


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "qwen3_next", "llama4_text"])
def test_packed_training_where_per_sample_attention_applies_or_not(name, family_dir, tmp_path):
    losses = _train(family_dir(name), str(tmp_path / "out"), "lora", str(tmp_path / "cache"), packing=True,
                    cutoff_len=256, max_samples=16)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
