"""KTO: the loss against hand-computed values, the data (desirable/undesirable tags, mismatched KL answers; the
tokens equal LLaMA-Factory's in test_lf_parity.py::qwen_kto), refusals, and real training that moves the reward
gap between desirable and undesirable answers the right way."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError, DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
DATA = os.path.join(REPO_ROOT, "examples", "data")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_loss_equals_the_hand_computed_value():
    from lmf.train.kto import kl_estimate, kto_losses

    policy = torch.tensor([-10.0, -12.0, -7.0])
    ref = torch.tensor([-11.0, -11.5, -7.0])
    desirable = torch.tensor([True, False, True])
    kl = kl_estimate(torch.tensor([-20.0, -21.0, -19.0]), torch.tensor([-20.5, -20.0, -19.9]))
    assert float(kl) == pytest.approx((0.5 - 1.0 + 0.9) / 3)
    losses, rewards = kto_losses(policy, ref, desirable, kl, beta=0.5, chosen_weight=1.5, rejected_weight=0.7)
    z = (0.5 - 1.0 + 0.9) / 3
    expected = [1.5 * (1 - _sigmoid(0.5 * (1.0 - z))), 0.7 * (1 - _sigmoid(0.5 * (z - (-0.5)))),
                1.5 * (1 - _sigmoid(0.5 * (0.0 - z)))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.25, 0.0])
    assert float(kl_estimate(torch.tensor([-5.0]), torch.tensor([-1.0]))) == 0.0  # clamped at 0


def test_ratio_and_difference_metrics_average_over_their_own_examples():
    from lmf.train.metrics import Difference, Ratio, accumulate, finalize

    sums: dict = {}
    accumulate(sums, {"r/c": Ratio(3.0, 2), "r/r": Ratio(0.0, 0), "m": Difference("r/c", "r/r"), "kl": 0.5})
    accumulate(sums, {"r/c": Ratio(0.0, 0), "r/r": Ratio(-2.0, 1), "m": Difference("r/c", "r/r"), "kl": 1.5})
    names = sorted(sums)
    assert finalize(names, [sums[k] for k in names], 2) == {"r/c": 1.5, "r/r": -2.0, "m": 3.5, "kl": 1.0}
    only_chosen: dict = {}
    accumulate(only_chosen, {"r/c": Ratio(1.0, 1), "r/r": Ratio(0.0, 0), "m": Difference("r/c", "r/r")})
    names = sorted(only_chosen)
    assert finalize(names, [only_chosen[k] for k in names], 1) == {"r/c": 1.0}  # no undesirable answer: no mean


def _cfg(out, **overrides):
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=DATA, dataset="kto_en_demo", template="qwen", stage="kto",
               cutoff_len=256, max_samples=64, output_dir=str(out), max_steps=4, logging_steps=1,
               per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3, lora_target="all",
               finetuning_type="lora", save_steps=100, disable_tqdm=True,
               preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "cache"))
    raw.update(overrides)
    return build_config(raw)


def test_feedback_data_pairs_each_prompt_with_the_previous_answer(tmp_path):
    from lmf.train.workflow import load_tokenizer_and_data

    with open(os.path.join(DATA, "kto_en_demo.json"), encoding="utf-8") as fh:
        records = json.load(fh)[:6]
    tokenizer, template, data = load_tokenizer_and_data(_cfg(tmp_path / "o", max_samples=6), "kto")
    rows = data.train_dataset
    assert [r["kto_tags"] for r in rows] == [r["label"] for r in records]
    for i, row in enumerate(rows):
        answer = tokenizer.decode([t for t in row["labels"] if t >= 0])
        kl_answer = tokenizer.decode([t for t in row["kl_labels"] if t >= 0])
        assert answer.startswith(records[i]["messages"][-1]["content"][:20])
        assert kl_answer.startswith(records[i - 1]["messages"][-1]["content"][:20])  # row 0 takes the last one
        prompt = row["input_ids"][:next(j for j, t in enumerate(row["labels"]) if t >= 0)]
        kl_prompt = row["kl_input_ids"][:next(j for j, t in enumerate(row["kl_labels"]) if t >= 0)]
        shorter, longer = sorted((prompt, kl_prompt), key=len)  # each side truncated to its own answer's length
        assert longer[:len(shorter)] == shorter
    assert data.stats["train"]["desirable"] + data.stats["train"]["undesirable"] == 6


def test_bad_kto_data_and_keys_are_refused(tmp_path):
    from lmf.train.workflow import load_tokenizer_and_data

    with pytest.raises(DataError, match=r"dataset 'identity' has no kto_tag column"):
        load_tokenizer_and_data(_cfg(tmp_path / "a", dataset="identity"), "kto")
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "kto.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "yes"}]))
    (bad / "dataset_info.json").write_text(json.dumps({"kto": {
        "file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    with pytest.raises(DataError, match=r"kto.json: record 1: field 'label' must be true or false, got 'yes'"):
        load_tokenizer_and_data(_cfg(tmp_path / "b", dataset_dir=str(bad), dataset="kto"), "kto")
    with pytest.raises(ConfigError, match="precompute_ref_log_probs"):
        _cfg(tmp_path / "c", precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="'packing' is not implemented for stage kto"):
        _cfg(tmp_path / "d", packing=True)
    with pytest.raises(ConfigError, match="kto_rejected_weight"):
        _cfg(tmp_path / "e", kto_rejected_weight=-1.0)


def _history(out) -> list[dict]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)["log_history"]


def test_lora_kto_widens_the_reward_gap_on_its_data(tmp_path):
    """The training data evaluated as it trains: desirable answers gain reward over undesirable ones."""
    from lmf.train.workflow import run_training

    out = tmp_path / "kto"
    run_training(_cfg(out, max_steps=24, eval_dataset="kto_en_demo", eval_strategy="steps", eval_steps=6,
                      per_device_eval_batch_size=16))
    history = _history(out)
    evals = [h for h in history if "eval_rewards/margins" in h]
    train = [h for h in history if "loss" in h]
    assert len(evals) == 4 and len(train) == 24
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] + 0.5, evals
    assert evals[-1]["eval_rewards/chosen"] > evals[-1]["eval_rewards/rejected"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all({"kl", "rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(h) for h in train[:1])
    assert os.path.isfile(out / "adapter_model.safetensors")


def test_full_kto_uses_a_frozen_reference_and_trains(tmp_path, caplog):
    import logging

    from lmf.train.workflow import run_training

    out = tmp_path / "full"
    with caplog.at_level(logging.INFO, logger="lmf"):
        run_training(_cfg(out, finetuning_type="full", learning_rate=1e-3, max_steps=6, pref_ftx=0.5, max_samples=8))
    assert "loading the frozen reference model" in caplog.text
    losses = [h["loss"] for h in _history(out) if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert os.path.isfile(out / "model.safetensors")


@pytest.mark.slow
def test_kto_on_two_processes_matches_one(tmp_path):
    from test_e2e_sft import run_lmf

    common = ("max_samples=32", "max_steps=3", "logging_steps=1", "disable_tqdm=true", "cutoff_len=128")
    one, two = tmp_path / "one", tmp_path / "two"
    # the KL term is estimated per micro-batch across ranks: one process with micro-batch 8 sees what two see
    p1 = run_lmf("kto", "examples/demo_lora_kto.yaml", f"output_dir={one}", "per_device_train_batch_size=8",
                 "gradient_accumulation_steps=2", *common)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = run_lmf("kto", "examples/demo_lora_kto.yaml", f"output_dir={two}", "per_device_train_batch_size=4",
                 "gradient_accumulation_steps=2", *common,
                 env_extra={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert p2.returncode == 0, p2.stderr[-3000:]
    first = [h for h in _history(one) if "loss" in h]
    second = [h for h in _history(two) if "loss" in h]
    assert [h["loss"] for h in second] == pytest.approx([h["loss"] for h in first], rel=1e-4)
    assert [h["rewards/chosen"] for h in second] == pytest.approx([h["rewards/chosen"] for h in first], abs=1e-4)
