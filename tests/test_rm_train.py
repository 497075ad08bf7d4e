"""Reward model end to end through run_experiment: accuracy rises, the saved RM reloads and scores identically, resume."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmf.model.value_head import VALUE_HEAD_WEIGHTS, load_reward_model, score
from lmf.experiment import run_experiment

from test_dpo_train import history, pref_argv, train_entries, write_toy_preference_data  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_toy_preference_data(tmp_path_factory.mktemp("toy_rm"))


def rm_argv(model_dir, data_dir, out, **kw):
    return pref_argv(model_dir, data_dir, out, stage="rm", **kw)


def eval_pairs(argv: list[str]):
    """The run's tokenized eval pairs as one PairwiseCollator batch (rebuilt from the same config)."""
    from lmf.config import get_config
    from lmf.data.collator import PairwiseCollator
    from lmf.train.workflow import load_tokenizer_and_data

    cfg = get_config(argv)
    tokenizer, _, data = load_tokenizer_and_data(cfg, "rm")
    rows = [data.eval_dataset[i] for i in range(len(data.eval_dataset))]
    return PairwiseCollator(tokenizer)(rows), len(rows)


@pytest.mark.parametrize("ftype", ["lora", "full"])
def test_rm_accuracy_rises_and_saved_model_scores_identically(tiny_model_dir, toy_data, tmp_path, ftype):
    out = str(tmp_path / ftype)
    argv = rm_argv(tiny_model_dir, toy_data, out, dataset="toy_pref_words", finetuning_type=ftype, val_size=8,
                   eval_strategy="steps", eval_steps=4, max_steps=12, learning_rate=5e-3 if ftype == "lora" else 5e-4)
    run_experiment(argv, "rm")
    steps = train_entries(out)
    evals = [h for h in history(out) if "eval_loss" in h]
    assert len(steps) == 12 and [h["step"] for h in evals] == [4, 8, 12]
    # the fresh value head starts near chance on the first batches and ends separating every pair
    assert sum(h["accuracy"] for h in steps[:2]) / 2 <= 0.75
    assert sum(h["accuracy"] for h in steps[-3:]) / 3 == 1.0
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert evals[-1]["eval_accuracy"] == 1.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_scores/margins"] > evals[0]["eval_scores/margins"]

    # outputs: value head next to the adapter / model; no v_head weights inside the model files
    assert os.path.isfile(os.path.join(out, VALUE_HEAD_WEIGHTS))
    model_file = "adapter_model.safetensors" if ftype == "lora" else "model.safetensors"
    assert not any("v_head" in k for k in load_file(os.path.join(out, model_file)))

    # reload and score the eval pairs: identical to what the trainer measured in-process at the last step
    reward_model = (load_reward_model(tiny_model_dir, out, dtype=torch.float32) if ftype == "lora"
                    else load_reward_model(out, dtype=torch.float32))
    batch, n = eval_pairs(argv)
    with torch.no_grad():
        scores = score(reward_model, batch["input_ids"], batch["attention_mask"])
    chosen, rejected = scores[:n], scores[n:]
    assert (chosen > rejected).all()
    assert chosen.mean().item() == pytest.approx(evals[-1]["eval_scores/chosen"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(evals[-1]["eval_scores/rejected"], abs=1e-4)


def test_rm_resume_restores_value_head_exactly(tiny_model_dir, toy_data, tmp_path):
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    kw = dict(max_steps=6, save_steps=3, lr_scheduler_type="cosine")
    run_experiment(rm_argv(tiny_model_dir, toy_data, full_dir, **kw), "rm")
    assert os.path.isfile(os.path.join(full_dir, "checkpoint-3", VALUE_HEAD_WEIGHTS))
    os.makedirs(part_dir)
    shutil.copytree(os.path.join(full_dir, "checkpoint-3"), os.path.join(part_dir, "checkpoint-3"))
    run_experiment(rm_argv(tiny_model_dir, toy_data, part_dir, resume_from_checkpoint=True, **kw), "rm")
    assert [h["loss"] for h in train_entries(part_dir)] == [h["loss"] for h in train_entries(full_dir)]
    for name in (VALUE_HEAD_WEIGHTS, "adapter_model.safetensors"):
        a, b = load_file(os.path.join(full_dir, name)), load_file(os.path.join(part_dir, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
