"""Checkpoints and resume: exact continuation, automatic resume, output_dir rules, rotation."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import losses, make_config, train_tiny
from lmf.extras.errors import ConfigError

torch.set_num_threads(1)


def _weights(out_dir: str, ftype: str) -> dict:
    return load_file(os.path.join(out_dir, "adapter_model.safetensors" if ftype == "lora" else "model.safetensors"))


@pytest.mark.parametrize("ftype,extra", [("lora", {"lora_dropout": 0.1, "logging_steps": 2}), ("full", {"weight_decay": 0.01})])
def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path, ftype, extra):
    """run(6 steps) == run(3 steps) + resume(3 more): same loss history and bit-identical final weights.

    20 rows, micro-batch 4, accumulation 2 -> 5 micro-batches an epoch in steps of 2, 2, 1: the checkpoint at
    step 2 sits mid-epoch (4 of 5 micro-batches consumed) and the resumed run crosses the epoch boundary.
    """
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    kw = dict(finetuning_type=ftype, max_steps=6, save_steps=2, learning_rate=5e-3, lr_scheduler_type="cosine",
              warmup_steps=2, **extra)
    _, ref = train_tiny(make_config(tiny_model_dir, full_dir, **kw))
    # the "interrupted" run: only checkpoint-2 survived (the crash happened before step 4)
    os.makedirs(part_dir)
    shutil.copytree(os.path.join(full_dir, "checkpoint-2"), os.path.join(part_dir, "checkpoint-2"))
    saved = json.load(open(os.path.join(part_dir, "checkpoint-2", "trainer_state.json")))
    assert saved["global_step"] == 2 and saved["data_epoch"] == 0 and saved["batch_in_epoch"] == 4
    _, resumed = train_tiny(make_config(tiny_model_dir, part_dir, resume_from_checkpoint=True, **kw))
    assert losses(resumed) == losses(ref)
    assert [h["lr"] for h in resumed.log_history] == [h["lr"] for h in ref.log_history]
    assert [h["step"] for h in ref.log_history] == ([2, 4, 6] if ftype == "lora" else [1, 2, 3, 4, 5, 6])
    a, b = _weights(full_dir, ftype), _weights(part_dir, ftype)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_from_explicit_path_and_auto_resume(tiny_model_dir, tmp_path):
    ref_dir = str(tmp_path / "ref")
    kw = dict(max_steps=4, save_steps=2)
    _, ref = train_tiny(make_config(tiny_model_dir, ref_dir, **kw))
    # explicit path into a fresh output_dir
    _, explicit = train_tiny(make_config(tiny_model_dir, str(tmp_path / "explicit"),
                                         resume_from_checkpoint=os.path.join(ref_dir, "checkpoint-2"), **kw))
    assert losses(explicit) == losses(ref)
    # relaunch in a dir holding an unfinished run (plus a half-written temp dir from the crash): resumes automatically
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    shutil.copytree(os.path.join(ref_dir, "checkpoint-2"), crash_dir / "checkpoint-2")
    (crash_dir / ".tmp-checkpoint-3-abc").mkdir()
    (crash_dir / ".tmp-checkpoint-3-abc" / "optimizer.pt").write_bytes(b"partial")
    _, auto = train_tiny(make_config(tiny_model_dir, str(crash_dir), overwrite_output_dir=True, **kw))
    assert losses(auto) == losses(ref)
    assert not (crash_dir / ".tmp-checkpoint-3-abc").exists()


def test_output_dir_rules(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    train_tiny(make_config(tiny_model_dir, out, max_steps=2, save_steps=1))
    # a finished run is never silently overwritten
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        train_tiny(make_config(tiny_model_dir, out, max_steps=2))
    # overwrite_output_dir starts over: the old run is moved under .previous/, a fresh history
    _, state = train_tiny(make_config(tiny_model_dir, out, max_steps=3, save_steps=100, overwrite_output_dir=True))
    assert state.log_history[0]["step"] == 1 and len(state.log_history) == 3
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-3"]
    (previous,) = os.listdir(os.path.join(out, ".previous"))
    assert sorted(p for p in os.listdir(os.path.join(out, ".previous", previous)) if p.startswith("checkpoint-")) == \
        ["checkpoint-1", "checkpoint-2"]
    # checkpoints of an unfinished run with another trajectory: an error, even with overwrite_output_dir
    os.remove(os.path.join(out, "trainer_state.json"))
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="another training run"):
            train_tiny(make_config(tiny_model_dir, out, max_steps=3, learning_rate=1e-4, overwrite_output_dir=overwrite))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train_tiny(make_config(tiny_model_dir, str(tmp_path / "empty"), resume_from_checkpoint=True))
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        train_tiny(make_config(tiny_model_dir, str(tmp_path / "x"), resume_from_checkpoint=str(tmp_path / "nope")))


def test_save_total_limit_keeps_newest(tiny_model_dir, tmp_path):
    out = str(tmp_path / "rot")
    train_tiny(make_config(tiny_model_dir, out, max_steps=5, save_steps=1, save_total_limit=2))
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-5"]


def test_atomic_commit_replaces_and_ignores_partial(tmp_path):
    from lmf.train import checkpoint as ckpt
    from lmf.train.durable import commit_dir, make_temp_dir

    out = str(tmp_path)
    tmp = make_temp_dir(out, "checkpoint-7")
    ckpt.write_json(os.path.join(tmp, "trainer_state.json"), {"global_step": 7})
    assert ckpt.latest_checkpoint(out) is None  # not renamed yet: invisible
    commit_dir(tmp, os.path.join(out, "checkpoint-7"))
    os.makedirs(os.path.join(out, "checkpoint-9"))  # no trainer_state.json: incomplete
    assert ckpt.latest_checkpoint(out) == os.path.join(out, "checkpoint-7")
    assert oct(os.stat(os.path.join(out, "checkpoint-7")).st_mode & 0o777) != "0o700"


def test_resume_with_another_micro_batch_skips_the_consumed_samples(tiny_model_dir, tmp_path):
    ref = str(tmp_path / "ref")
    train_tiny(make_config(tiny_model_dir, ref, max_steps=4, save_steps=2))  # 20 rows: 5 micro-batches of 4 per epoch
    ck = os.path.join(ref, "checkpoint-2")
    assert json.load(open(os.path.join(ck, "trainer_state.json")))["batch_in_epoch"] == 4  # 16 samples consumed
    _, state = train_tiny(make_config(tiny_model_dir, str(tmp_path / "b2"), max_steps=4, resume_from_checkpoint=ck,
                                      per_device_train_batch_size=2, gradient_accumulation_steps=4))
    # 16 samples = 8 micro-batches of 2 skipped; step 3 takes the 2 left in epoch 0 (a step never crosses an
    # epoch boundary), step 4 takes 4 micro-batches of epoch 1
    assert (state.global_step, state.data_epoch, state.batch_in_epoch) == (4, 1, 4)


def test_never_writes_over_a_model_directory(tiny_model_dir, tmp_path):
    # the base model directory itself, even with overwrite_output_dir
    with pytest.raises(ConfigError, match="input model"):
        train_tiny(make_config(tiny_model_dir, tiny_model_dir, overwrite_output_dir=True))
    # another model directory (no trainer_state.json): refused without overwrite_output_dir
    other = tmp_path / "some_model"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(ConfigError, match="finished run"):
        train_tiny(make_config(tiny_model_dir, str(other), max_steps=1))
    assert (other / "model.safetensors").is_file()


def test_ignore_data_skip_starts_the_data_over(tiny_model_dir, tmp_path):
    """transformers' ignore_data_skip: the step, schedule and weights resume, the data restarts at its first batch."""
    ref_dir = str(tmp_path / "ref")
    train_tiny(make_config(tiny_model_dir, ref_dir, max_steps=2, save_steps=2))
    saved = json.load(open(os.path.join(ref_dir, "checkpoint-2", "trainer_state.json")))
    assert (saved["data_epoch"], saved["batch_in_epoch"]) == (0, 4)
    for ignore, expected in ((False, (0, 5)), (True, (0, 2))):
        _, state = train_tiny(make_config(tiny_model_dir, str(tmp_path / f"again-{ignore}"), max_steps=3,
                                          resume_from_checkpoint=os.path.join(ref_dir, "checkpoint-2"),
                                          ignore_data_skip=ignore))
        assert state.global_step == 3 and (state.data_epoch, state.batch_in_epoch) == expected
