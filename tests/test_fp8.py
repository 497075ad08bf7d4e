"""fp8 (LLaMA-Factory main's FP8 keys) with torchao's float8 linears: which layers convert (LLaMA-Factory's filter),
training in float8 on the CPU (oneDNN's float8 matmuls) tracks full precision and saves ordinary weights, and what
cannot work is refused naming the hardware or the other key."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError, NotAvailableError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")


def test_the_eligible_linears_convert_and_the_ends_of_the_model_do_not(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lmf.model.fp8 import convert_to_fp8, fp8_module_filter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_layers = model.config.num_hidden_layers
    assert convert_to_fp8(model, torch.device("cpu")) == 7 * n_layers  # q k v o gate up down in every layer
    assert type(model.lm_head).__name__ == "Linear" and type(model.model.embed_tokens).__name__ == "Embedding"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Float8Linear"
    assert not fp8_module_filter(torch.nn.Linear(64, 24), "model.layers.0.mlp.up_proj")  # 24 % 16 != 0
    assert not fp8_module_filter(torch.nn.Linear(64, 64), "score.output")
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model(ids, labels=ids).loss.backward()  # float8 forward and backward
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def _train(tiny_model_dir, demo_data_dir, tmp_path, name, **keys):
    from lmf.train.workflow import run_training

    out = tmp_path / name
    raw = dict(model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
               cutoff_len=32, max_samples=16, output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
               learning_rate=1e-3, save_strategy="no", disable_tqdm=True, logging_steps=1,
               preprocessing_cache_dir=str(tmp_path / "cache"))
    run_training(build_config({**raw, **keys}))
    return out, [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_fp8_training_tracks_full_precision_and_saves_ordinary_weights(tiny_model_dir, demo_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    fp8_out, fp8 = _train(tiny_model_dir, demo_data_dir, tmp_path, "fp8", finetuning_type="full", fp8=True)
    _, plain = _train(tiny_model_dir, demo_data_dir, tmp_path, "plain", finetuning_type="full")
    assert len(fp8) == 3 and fp8[-1] < fp8[0]
    assert fp8 == pytest.approx(plain, rel=2e-2) and fp8 != plain  # float8 matmuls: close, not identical
    reloaded = AutoModelForCausalLM.from_pretrained(str(fp8_out))
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_fp8_under_lora_computes_the_frozen_base_in_float8(tiny_model_dir, demo_data_dir, tmp_path):
    out, losses = _train(tiny_model_dir, demo_data_dir, tmp_path, "lora", fp8=True, learning_rate=1e-2, max_steps=2)
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert (out / "adapter_model.safetensors").is_file()


def test_a_gpu_without_float8_is_refused_naming_it(monkeypatch):
    from lmf.model.fp8 import check_fp8_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(NotAvailableError, match="compute capability 8.9 or newer .*A100-SXM4-80GB is 8.0"):
        check_fp8_device(torch.device("cuda", 0))
    check_fp8_device(torch.device("cpu"))


@pytest.mark.parametrize("keys, message", [
    ({"fp8": True, "fp8_backend": "te"}, "'fp8_backend': te is not implemented"),
    ({"fp8": True, "quantization_bit": 4}, "'fp8' and 'quantization_bit'"),
])
def test_fp8_combinations_that_cannot_work_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", **keys})


def test_the_fsdp_float8_all_gather_turns_fp8_on_as_llamafactory_does():
    cfg = build_config({"model_name_or_path": "m", "fp8_enable_fsdp_float8_all_gather": True, "fsdp": "full_shard"})
    assert cfg.training.fp8


def test_loading_a_model_does_not_import_torchao_unless_something_needs_it(tiny_model_dir):
    """transformers' torchao quantizer imports torchao whenever it is installed (~1.3 s a process): lmf defers it."""
    import subprocess
    import sys

    code = ("import sys, lmf.model\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({tiny_model_dir!r})\n"
            "from transformers.quantizers import quantizer_torchao as q\n"
            "print('torchao' in sys.modules, q.is_torchao_available())\n"
            "import torchao\nprint(q.is_torchao_available())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr[-2000:]  # seen once imported
