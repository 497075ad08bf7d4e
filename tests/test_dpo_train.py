"""DPO end to end through run_experiment (config -> data -> model -> shared Trainer -> outputs) on the tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmf.extras.errors import ConfigError
from lmf.experiment import run_experiment

torch.set_num_threads(1)

CHOSEN = "Sure, I am happy to help with that."
REJECTED = "No."


def write_toy_preference_data(folder, n: int = 32) -> str:
    """A separable preference set: the chosen answer is always one phrase, the rejected another.

    Registered twice in dataset_info.json: alpaca layout (``toy_pref``) and sharegpt layout (``toy_pref_sg``).
    ``toy_pref_words`` is harder: both answers share a sentence and differ in one word, drawn from a
    "good" or a "bad" word list (separable, but a random value head starts near chance).
    """
    os.makedirs(folder, exist_ok=True)
    topics = ["the sea", "a cat", "bread", "rain", "mountains", "music", "a friend", "the moon"]
    alpaca = [{"instruction": f"Tell me about {topics[i % len(topics)]}, request {i}.", "input": "",
               "chosen": CHOSEN, "rejected": REJECTED} for i in range(n)]
    sharegpt = [{"conversations": [{"from": "human", "value": r["instruction"]}],
                 "chosen": {"from": "gpt", "value": CHOSEN}, "rejected": {"from": "gpt", "value": REJECTED}}
                for r in alpaca]
    good, bad = ["apple", "river", "green", "music", "happy", "light"], ["stone", "cloud", "seven", "paper", "angry", "night"]
    words = [{"instruction": f"Pick a word for item {i}.", "input": "",
              "chosen": f"I pick {good[(i * 5) % 6]} for this one.", "rejected": f"I pick {bad[(i * 7) % 6]} for this one."}
             for i in range(n)]
    info = {
        "toy_pref": {"file_name": "toy_pref.json", "ranking": True,
                     "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "toy_pref_sg": {"file_name": "toy_pref_sg.json", "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "toy_pref_words": {"file_name": "toy_pref_words.json", "ranking": True,
                           "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    }
    for name, rows in (("toy_pref.json", alpaca), ("toy_pref_sg.json", sharegpt), ("toy_pref_words.json", words),
                       ("dataset_info.json", info)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
            json.dump(rows, fh)
    return str(folder)


def pref_argv(model_dir: str, data_dir: str, output_dir: str, **overrides) -> list[str]:
    """``key=value`` argv of a short CPU preference run on the tiny model."""
    keys = dict(
        model_name_or_path=model_dir, stage="dpo", finetuning_type="lora", lora_rank=8, lora_target="all",
        dataset_dir=data_dir, dataset="toy_pref", template="qwen", cutoff_len=64, output_dir=output_dir,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=5e-3, max_steps=10, logging_steps=1, save_steps=100, lr_scheduler_type="constant",
        disable_tqdm=True, seed=42, report_to="none", preprocessing_num_workers=1,
    )
    keys.update(overrides)
    return [f"{k}={v}" for k, v in keys.items()]


def history(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)["log_history"]


def train_entries(output_dir: str) -> list[dict]:
    return [h for h in history(output_dir) if "loss" in h]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_toy_preference_data(tmp_path_factory.mktemp("toy_pref"))


def test_lora_dpo_learns_toy_preference(tiny_model_dir, toy_data, tmp_path):
    out = str(tmp_path / "dpo")
    run_experiment(pref_argv(tiny_model_dir, toy_data, out, val_size=8, eval_strategy="steps", eval_steps=5), "dpo")
    steps = train_entries(out)
    assert len(steps) == 10
    first, last = steps[0], steps[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference before the first update
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert last["rewards/accuracies"] > 0.5
    assert last["rewards/margins"] > first["rewards/margins"] + 0.1
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert last["loss"] < 0.6
    evals = [h for h in history(out) if "eval_loss" in h]
    assert [h["step"] for h in evals] == [5, 10]
    assert evals[-1]["eval_rewards/accuracies"] > 0.5 and evals[-1]["eval_rewards/margins"] > 0
    assert evals[-1]["eval_loss"] < math.log(2)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_lmf_train_follows_stage_and_sft_command_refuses_dpo(tiny_model_dir, toy_data, tmp_path):
    with pytest.raises(ConfigError, match="dpo"):
        run_experiment(pref_argv(tiny_model_dir, toy_data, str(tmp_path / "x")), "sft")
    out = str(tmp_path / "train_cmd")
    run_experiment(pref_argv(tiny_model_dir, toy_data, out, dataset="toy_pref_sg", pref_loss="simpo", pref_beta=2.0,
                      simpo_gamma=0.5, max_steps=8), "train")
    steps = train_entries(out)
    # reference-free: rewards are beta * length-averaged log-probs, chosen ends above rejected
    assert steps[-1]["rewards/accuracies"] == 1.0 and steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]


def test_dpo_on_demo_sharegpt_ranking_data(tiny_model_dir, demo_data_dir, tmp_path):
    out = str(tmp_path / "demo")
    run_experiment(pref_argv(tiny_model_dir, demo_data_dir, out, dataset="dpo_en_demo", max_samples=16, cutoff_len=128,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, pref_ftx=0.5,
                      learning_rate=1e-4), "dpo")
    steps = train_entries(out)
    assert len(steps) == 3 and all(math.isfinite(h["loss"]) for h in steps)
    # pref_ftx adds the chosen answers' mean token NLL (about log(vocab) on a random model) to log(2)
    assert steps[0]["loss"] > math.log(2) + 1.0
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(steps[0])


def test_full_finetuning_frozen_reference_equals_precomputed(tiny_model_dir, toy_data, tmp_path):
    kw = dict(finetuning_type="full", learning_rate=1e-4, max_steps=4, pref_loss="ipo", pref_beta=0.5)
    frozen, pre = str(tmp_path / "frozen"), str(tmp_path / "pre")
    run_experiment(pref_argv(tiny_model_dir, toy_data, frozen, **kw), "dpo")
    run_experiment(pref_argv(tiny_model_dir, toy_data, pre, precompute_ref_log_probs=True, **kw), "dpo")
    a, b = train_entries(frozen), train_entries(pre)
    assert a[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-3, abs=1e-5)
    assert a[-1]["rewards/margins"] > 0
    assert os.path.isfile(os.path.join(frozen, "model.safetensors"))


def test_dpo_resume_equals_uninterrupted(tiny_model_dir, toy_data, tmp_path):
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    kw = dict(max_steps=6, save_steps=3, pref_loss="sigmoid", dpo_label_smoothing=0.1, lr_scheduler_type="cosine")
    run_experiment(pref_argv(tiny_model_dir, toy_data, full_dir, **kw), "dpo")
    os.makedirs(part_dir)
    shutil.copytree(os.path.join(full_dir, "checkpoint-3"), os.path.join(part_dir, "checkpoint-3"))
    run_experiment(pref_argv(tiny_model_dir, toy_data, part_dir, resume_from_checkpoint=True, **kw), "dpo")
    ref, resumed = train_entries(full_dir), train_entries(part_dir)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in ref]
    assert [h["rewards/margins"] for h in resumed] == [h["rewards/margins"] for h in ref]
    a = load_file(os.path.join(full_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(part_dir, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_preference_settings_name_the_key(tiny_model_dir, toy_data, tmp_path):
    with pytest.raises(ConfigError, match="dpo_label_smoothing"):
        run_experiment(pref_argv(tiny_model_dir, toy_data, str(tmp_path / "a"), pref_loss="ipo", dpo_label_smoothing=0.1), "dpo")
    with pytest.raises(ConfigError, match="pref_beta"):
        run_experiment(pref_argv(tiny_model_dir, toy_data, str(tmp_path / "b"), pref_beta=0), "dpo")
