"""lmf export: merge a LoRA adapter into the tiny model, reload the folder, compare logits with base+adapter."""

from __future__ import annotations

import json
import os

import pytest

from lmf.export import run_export
from lmf.extras.errors import ConfigError

LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA adapter with random non-zero B matrices (a real delta), saved with peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=LINEAR_MODULES))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    out = str(tmp_path_factory.mktemp("adapter"))
    peft_model.save_pretrained(out)
    return out


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_export_reloads_with_base_plus_adapter_logits(tiny_model_dir, lora_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lmf.data.template import get_template

    out = tmp_path / "merged"
    code = run_export(["--model", tiny_model_dir, "--adapter", lora_adapter, "--template", "qwen",
                       f"export_dir={out}", "export_size=0.0003"])
    assert code == 0

    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3, files  # 0.0003 GB = 300 kB shards of a ~1.3 MB model
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not any("lora" in key for key in index["weight_map"])  # merged, not an adapter
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert name in files
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".merged")]  # no temp folder left behind

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = get_template("qwen", tokenizer).encode_prompt(tokenizer, MESSAGES)
    base_logits = _logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, lora_adapter).eval()
    expected = _logits(with_adapter, ids)
    got = _logits(merged, ids)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the model

    # the exported tokenizer's chat template renders the training template's prompt
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert list(rendered) == ids
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id in (im_end, [im_end]) and gen.pad_token_id == tokenizer.pad_token_id


def test_exported_model_chats_like_base_plus_adapter(tiny_model_dir, lora_adapter, tmp_path):
    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    out = tmp_path / "merged"
    run_export(["--model", tiny_model_dir, "--adapter", lora_adapter, "--template", "qwen", f"export_dir={out}"])
    assert os.path.isfile(out / "model.safetensors")  # default 5 GB shards: one file
    settings = ["--template", "qwen", "do_sample=false", "max_new_tokens=8"]
    with_adapter = create_engine(load_serving_config(["--model", tiny_model_dir, "--adapter", lora_adapter, *settings]))
    exported = create_engine(load_serving_config(["--model", str(out), *settings]))
    assert exported.chat(MESSAGES).text == with_adapter.chat(MESSAGES).text


def test_refuses_a_non_empty_export_dir_unless_overwrite(tiny_model_dir, lora_adapter, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--model", tiny_model_dir, "--adapter", lora_adapter, "--template", "qwen", f"export_dir={out}"]
    with pytest.raises(ConfigError, match="not empty.*export_overwrite"):
        run_export(args)
    assert os.listdir(out) == ["keep.txt"]
    run_export(args + ["export_overwrite=true"])
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(p for p in os.listdir(tmp_path)) == ["busy"]  # neither temp nor old copy left behind


def test_missing_adapter_or_export_dir_is_a_clear_error(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no-adapter"
    with pytest.raises(ConfigError, match="adapter_name_or_path.*no-adapter.*does not exist"):
        run_export(["--model", tiny_model_dir, "--adapter", str(missing), "--template", "qwen", f"export_dir={out}"])
    assert not out.exists()
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    with pytest.raises(ConfigError, match="adapter_config.json"):
        run_export(["--model", tiny_model_dir, "--adapter", str(not_an_adapter), "--template", "qwen", f"export_dir={out}"])
    with pytest.raises(ConfigError, match="export_dir"):
        run_export(["--model", tiny_model_dir, "--template", "qwen"])
    with pytest.raises(ConfigError, match="export_size"):
        run_export(["--model", tiny_model_dir, "--template", "qwen", f"export_dir={out}", "export_size=0"])
    assert not out.exists()


@pytest.mark.parametrize("name", ["demo_chat.yaml", "demo_export.yaml"])
def test_demo_configs_are_valid(name):
    from lmf.chat.options import load_serving_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_serving_config([os.path.join(root, "examples", name)])
    assert cfg.model.adapter_name_or_path == "saves/demo/lora/sft" and cfg.data.template == "qwen"


def test_legacy_bin_format_needs_a_transformers_that_writes_it(tiny_model_dir, tmp_path):
    import inspect

    from transformers import PreTrainedModel

    from lmf.extras.errors import NotAvailableError

    if "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters:
        out = tmp_path / "bin"
        run_export(["--model", tiny_model_dir, "--template", "qwen", f"export_dir={out}", "export_legacy_format=true"])
        assert any(f.endswith(".bin") for f in os.listdir(out))
    else:
        with pytest.raises(NotAvailableError, match="only writes safetensors"):
            run_export(["--model", tiny_model_dir, "--template", "qwen", f"export_dir={tmp_path / 'bin'}",
                        "export_legacy_format=true"])
        assert not (tmp_path / "bin").exists()
