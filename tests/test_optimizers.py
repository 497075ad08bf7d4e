"""GaLore, APOLLO (and their layerwise variants), BAdam, Adam-mini and Muon: each steps, the loss falls, the
state it exists to shrink is smaller than AdamW's, resume is exact, LF's example YAMLs run."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError, NotAvailableError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
DATA = os.path.join(REPO_ROOT, "examples", "data")
LF_EXTRAS = os.path.join(REPO_ROOT, "..", "shared", "lf-examples", "extras")

OPTIMIZERS = {
    "galore": dict(use_galore=True, galore_rank=4, galore_update_interval=3),
    "galore_layerwise": dict(use_galore=True, galore_rank=4, galore_update_interval=3, galore_layerwise=True,
                             gradient_accumulation_steps=1),
    "apollo": dict(use_apollo=True, apollo_rank=4, apollo_update_interval=3),
    "apollo_layerwise": dict(use_apollo=True, apollo_rank=4, apollo_update_interval=3, apollo_layerwise=True,
                             gradient_accumulation_steps=1),
    "badam": dict(use_badam=True, badam_switch_interval=3),
    "adam_mini": dict(use_adam_mini=True),
    "muon": dict(use_muon=True),
    "adamw_8bit": dict(optim="adamw_8bit"),  # bitsandbytes (paged_adamw_8bit: test_mixture_of_depths)
}
PACKAGE = {"galore": "galore_torch", "apollo": "apollo_torch", "badam": "badam", "adam_mini": "adam_mini",
           "adamw_8bit": "bitsandbytes"}


def _needs(name: str) -> None:
    module = PACKAGE.get(name.replace("_layerwise", ""))
    if module:
        pytest.importorskip(module)


def _raw(out, **overrides) -> dict:
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=DATA, dataset="identity", template="qwen", cutoff_len=96,
               max_samples=32, output_dir=str(out), max_steps=8, logging_steps=1, per_device_train_batch_size=4,
               gradient_accumulation_steps=2, learning_rate=1e-3, finetuning_type="full", save_steps=100,
               disable_tqdm=True, seed=7, preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "c"))
    raw.update(overrides)
    return raw


def _losses(out) -> list[float]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


def _state_elements(optimizer) -> int:
    """Tensor elements held in the optimizer state (what the memory-saving optimizers shrink)."""
    subs = getattr(optimizer, "optimizers", [optimizer])
    total = 0
    for sub in subs:
        sub = getattr(sub, "base_optimizer", sub)  # BAdam: the AdamW of the active block
        for state in sub.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.numel() > 1:
                    total += value.numel()
                elif hasattr(value, "ortho_matrix") and torch.is_tensor(value.ortho_matrix):
                    total += value.ortho_matrix.numel()  # GaLore's projector
    return total


def _optimizer_after_steps(tmp_path, steps: int = 2, **keys):
    """A real model + the optimizer lmf builds for ``keys``, after ``steps`` steps on random tokens."""
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.optimizer import create_optimizer

    cfg = build_config(_raw(tmp_path / "o", **keys))
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    optimizer = create_optimizer(model, cfg.training, cfg.finetuning)
    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_trains_full_finetuning(tmp_path, name):
    _needs(name)
    from lmf.train.workflow import run_training

    out = tmp_path / name  # 16 samples in a fixed order: the first and the last 4 steps see the same batches
    run_training(build_config(_raw(out, **dict(OPTIMIZERS[name], max_samples=16, disable_shuffling=True))))
    losses = _losses(out)
    assert sum(losses[4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    base = _weights_of_base()
    trained = _weights(out)
    changed = {k for k in trained if not torch.equal(trained[k], base[k])}
    assert any("q_proj" in k for k in changed)
    if name == "badam":  # blocks are decoder layers: embeddings, final norm and head never train
        assert not any(k.startswith(("model.embed_tokens", "lm_head", "model.norm")) for k in changed), changed


@pytest.mark.parametrize("name", ["galore"])  # APOLLO seeds each projection by its index in the optimizer
def test_layerwise_steps_equal_the_whole_model_step_without_clipping(tmp_path, name):
    _needs(name)
    from lmf.train.workflow import run_training

    whole, layerwise = tmp_path / "whole", tmp_path / "layerwise"
    keys = dict(OPTIMIZERS[name], gradient_accumulation_steps=1, max_steps=4)
    run_training(build_config(_raw(whole, **keys, max_grad_norm=0)))
    run_training(build_config(_raw(layerwise, **keys, **{f"{name}_layerwise": True})))
    assert _losses(layerwise) == pytest.approx(_losses(whole), abs=1e-5)
    a, b = _weights(whole), _weights(layerwise)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def _weights_of_base() -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(DEMO_MODEL, "model.safetensors"))


@pytest.mark.parametrize("name", ["galore", "apollo", "badam", "adam_mini"])
def test_the_optimizer_state_is_smaller_than_adamws(tmp_path, name):
    _needs(name)
    _, adamw = _optimizer_after_steps(tmp_path)
    _, special = _optimizer_after_steps(tmp_path, **OPTIMIZERS[name])
    ratio = _state_elements(special) / _state_elements(adamw)
    assert ratio < 0.9, ratio


def test_galore_keeps_low_rank_moments_of_the_projected_weights(tmp_path):
    _needs("galore")
    model, optimizer = _optimizer_after_steps(tmp_path, **OPTIMIZERS["galore"])
    q = model.model.layers[0].self_attn.q_proj.weight
    state = optimizer.optimizers[0].state[q]
    assert 4 in state["exp_avg"].shape and state["exp_avg"].numel() < q.numel()


def test_badam_trains_one_block_at_a_time(tmp_path):
    _needs("badam")
    from lmf.train.workflow import run_training

    out = tmp_path / "one"
    run_training(build_config(_raw(out, use_badam=True, badam_switch_interval=100, max_steps=3)))
    base, trained = _weights_of_base(), _weights(out)
    changed = {k.split(".")[2] for k in trained if k.startswith("model.layers.") and not torch.equal(trained[k], base[k])}
    assert changed == {"0"}  # ascending from block 0; no switch within 3 steps


def test_muon_orthogonalises_hidden_weights_and_adamw_takes_the_rest(tmp_path):
    model, optimizer = _optimizer_after_steps(tmp_path, use_muon=True)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = p.ndim == 2 and "embed" not in name and "lm_head" not in name
        assert (id(p) in muon_ids) == expected, name


def test_bitsandbytes_adamw_keeps_8_bit_moments_of_the_large_weights(tmp_path):
    _needs("adamw_8bit")
    import bitsandbytes as bnb

    _, adamw = _optimizer_after_steps(tmp_path)
    model, eight = _optimizer_after_steps(tmp_path, optim="adamw_8bit")
    assert isinstance(eight, bnb.optim.AdamW)
    big = [p for p in model.parameters() if p.numel() >= 4096]  # smaller ones keep 32-bit moments (bitsandbytes)
    assert big and all(eight.state[p]["state1"].dtype == torch.uint8 for p in big)

    def state_bytes(optimizer):
        return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.numel() > 1)

    assert state_bytes(eight) < 0.4 * state_bytes(adamw)


@pytest.mark.parametrize("name", ["galore", "apollo_layerwise", "badam", "adam_mini", "muon", "adamw_8bit"])
def test_resume_is_exact(tmp_path, name):
    _needs(name)
    from lmf.train.workflow import run_training

    keys = dict(OPTIMIZERS[name], max_steps=6, save_steps=3, badam_switch_interval=2) if name == "badam" else \
        dict(OPTIMIZERS[name], max_steps=6, save_steps=3)
    straight = tmp_path / "straight"
    run_training(build_config(_raw(straight, **keys)))
    resumed = tmp_path / "resumed"  # a run that crashed after its step-3 checkpoint
    os.makedirs(resumed)
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    run_training(build_config(_raw(resumed, **keys)))
    a, b = _weights(straight), _weights(resumed)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, worst
    assert _losses(straight) == _losses(resumed)


def test_bitsandbytes_missing_names_the_pip_line(monkeypatch):
    import sys

    from lmf.train.optimizer import create_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it fails
    cfg = build_config({"model_name_or_path": "m", "optim": "paged_adamw_8bit"})
    with pytest.raises(NotAvailableError, match=r"paged_adamw_8bit needs bitsandbytes: pip install 'lmf\[qlora\]'"):
        create_optimizer(torch.nn.Linear(4, 4), cfg.training)


def test_a_missing_package_names_the_pip_line(monkeypatch):
    import importlib.util

    from lmf.train import optimizer_plugins

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "galore_torch" else real(n, *a))
    with pytest.raises(NotAvailableError, match=r"pip install 'lmf\[galore\]'"):
        optimizer_plugins.require_package("use_galore")


def test_combinations_that_cannot_work_are_refused():
    from lmf.dist.plan import plan_parallelism

    base = {"model_name_or_path": "m", "finetuning_type": "full"}
    cases = [({"use_galore": True, "finetuning_type": "lora"}, "full or freeze"),
             ({"use_galore": True, "use_badam": True}, "choose one optimizer"),
             ({"use_muon": True, "loraplus_lr_ratio": 4.0, "finetuning_type": "lora"}, "choose one optimizer"),
             ({"use_galore": True, "galore_layerwise": True, "gradient_accumulation_steps": 2}, "accumulation"),
             ({"use_apollo": True, "apollo_layerwise": True, "fp16": True, "gradient_accumulation_steps": 1}, "fp16"),
             ({"use_badam": True, "badam_mode": "ratio"}, "ratio is not implemented"),
             ({"use_adam_mini": True, "optim": "sgd"}, "sgd"),
             ({"use_galore": True, "optim": "paged_adamw_8bit"}, "'use_galore' and 'optim: paged_adamw_8bit'"),
             ({"optim": "adamw_8bit", "optim_args": "amsgrad=true"}, "not an argument of optim adamw_8bit")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config({**base, **change})
    with pytest.raises(ConfigError, match="FSDP"):
        plan_parallelism(build_config({**base, "use_galore": True, "fsdp": "full_shard"}), 2)
    with pytest.raises(ConfigError, match="one process"):
        plan_parallelism(build_config({**base, "use_badam": True}), 2)
    with pytest.raises(ConfigError, match="'optim': adamw_8bit with FSDP sharding"):
        plan_parallelism(build_config({**base, "optim": "adamw_8bit", "fsdp": "full_shard"}), 2)
    assert build_config({**base, "use_muon": True, "finetuning_type": "lora"}).finetuning.use_muon  # as in LF


@pytest.mark.parametrize("example", ["galore/llama3_full_sft.yaml", "apollo/llama3_full_sft.yaml",
                                     "badam/llama3_full_sft.yaml", "adam_mini/qwen2_full_sft.yaml",
                                     "muon/qwen2_full_sft.yaml"])
def test_llamafactory_examples_run_unchanged_but_for_the_model(tmp_path, example):
    _needs(example.split("/")[0])
    from lmf.train.workflow import run_training

    with open(os.path.join(LF_EXTRAS, example), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    out = tmp_path / "out"
    raw.update(model_name_or_path=DEMO_MODEL, output_dir=str(out), dataset_dir=DATA, max_samples=8, max_steps=3,
               cutoff_len=64, preprocessing_num_workers=1, disable_tqdm=True, save_steps=100, logging_steps=1,
               preprocessing_cache_dir=str(tmp_path / "c"))
    run_training(build_config(raw))
    assert os.path.isfile(out / "model.safetensors") and len(_losses(out)) == 3
