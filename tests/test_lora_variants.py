"""LoRA variants of LLaMA-Factory's extras: LoRA+ (B matrices at a higher learning rate)."""

from __future__ import annotations

import json
import os

import pytest

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
DATA = os.path.join(REPO_ROOT, "examples", "data")


def _raw(out, **overrides) -> dict:
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=DATA, dataset="identity", template="qwen", cutoff_len=128,
               max_samples=32, output_dir=str(out), max_steps=6, logging_steps=1, per_device_train_batch_size=4,
               gradient_accumulation_steps=2, learning_rate=1e-3, finetuning_type="lora", lora_target="all",
               save_steps=100, disable_tqdm=True, preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "c"))
    raw.update(overrides)
    return raw


def _losses(out) -> list[float]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]


def test_loraplus_puts_b_matrices_at_ratio_times_the_learning_rate(tmp_path):
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.optimizer import create_optimizer

    cfg = build_config(_raw(tmp_path / "o", loraplus_lr_ratio=16.0, weight_decay=0.01))
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    optimizer = create_optimizer(model, cfg.training, cfg.finetuning)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            expected = 1e-3 * 16 if "lora_B" in names[id(p)] else 1e-3
            assert group["lr"] == pytest.approx(expected), names[id(p)]
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-3, 1.6e-2])
    plain = create_optimizer(model, cfg.training, build_config(_raw(tmp_path / "p")).finetuning)
    assert [g["lr"] for g in plain.param_groups] == [1e-3]  # all LoRA weights are 2-D: one decay group


def test_loraplus_trains_b_faster_and_saves_a_plain_adapter(tmp_path):
    from safetensors.torch import load_file

    from lmf.train.workflow import run_training

    plain, plus = tmp_path / "plain", tmp_path / "plus"
    run_training(build_config(_raw(plain)))
    run_training(build_config(_raw(plus, loraplus_lr_ratio=16.0)))
    a, b = load_file(str(plain / "adapter_model.safetensors")), load_file(str(plus / "adapter_model.safetensors"))
    b_plain = sum(float(v.norm()) for k, v in a.items() if "lora_B" in k)
    b_plus = sum(float(v.norm()) for k, v in b.items() if "lora_B" in k)
    assert b_plus > 3 * b_plain  # B starts at zero: its distance travelled scales with its learning rate
    assert _losses(plus)[-1] < _losses(plain)[-1]
    with pytest.raises(ConfigError, match="loraplus_lr_ratio' needs finetuning_type: lora"):
        build_config(_raw(tmp_path / "x", finetuning_type="full", loraplus_lr_ratio=16.0))
