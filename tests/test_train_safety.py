"""Data safety of relaunches: the resume fingerprint is an allow-list, nothing is ever deleted implicitly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from _train_helpers import PadCollator, losses, make_config, tokenized_sft_rows, train_tiny
from lmf.extras.errors import ConfigError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

torch.set_num_threads(1)


def tree_digest(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def crashed_copy(finished_dir: str, dst: str, step: int) -> str:
    """An output_dir as a crash after ``checkpoint-{step}`` leaves it: that checkpoint only."""
    os.makedirs(dst)
    shutil.copytree(os.path.join(finished_dir, f"checkpoint-{step}"), os.path.join(dst, f"checkpoint-{step}"))
    return dst


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 4-step run checkpointed every 2 steps (dropout on, so every RNG draw shows)."""
    out = str(tmp_path_factory.mktemp("safety") / "ref")
    _, state = train_tiny(make_config(tiny_model_dir, out, max_steps=4, save_steps=2, lora_dropout=0.1))
    return out, state


def test_fingerprint_is_an_allow_list():
    from lmf.config.parser import KEY_INDEX, build_config
    from lmf.train.resume import TRAJECTORY_KEYS, resume_fingerprint

    assert TRAJECTORY_KEYS <= set(KEY_INDEX), TRAJECTORY_KEYS - set(KEY_INDEX)
    base = dict(model_name_or_path="m", output_dir="o")
    ref = resume_fingerprint(build_config(base))
    neutral = dict(temperature=0.5, top_p=0.1, max_new_tokens=7, max_steps=99, num_train_epochs=9.0, save_steps=3,
                   logging_steps=2, eval_steps=4, eval_strategy="steps", per_device_eval_batch_size=8, report_to="none",
                   dataloader_num_workers=2, preprocessing_num_workers=2, ddp_timeout=60, export_dir="x",
                   infer_backend="vllm", vllm_maxlen=128, save_total_limit=2, plot_loss=True, run_name="r",
                   overwrite_output_dir=True, output_dir="elsewhere", loss_chunk_size=64, padding_free=False,
                   flash_attn="eager", disable_tqdm=True)
    for key, value in neutral.items():
        assert resume_fingerprint(build_config(dict(base, **{key: value}))) == ref, key
    shaping = dict(learning_rate=1e-3, lora_rank=4, seed=7, per_device_train_batch_size=3, cutoff_len=64,
                   gradient_accumulation_steps=3, lr_scheduler_type="cosine", dataset="x", template="qwen",
                   weight_decay=0.1, warmup_steps=3, finetuning_type="full", train_on_prompt=True,
                   image_max_pixels=65536, image_min_pixels=4096)
    for key, value in shaping.items():
        assert resume_fingerprint(build_config(dict(base, **{key: value}))) != ref, key
    # a key added later is recorded only away from its default: older checkpoints keep their fingerprint
    assert resume_fingerprint(build_config(dict(base, image_max_pixels=768 * 768))) == ref


def test_relaunch_with_a_generation_key_resumes(reference_run, tiny_model_dir, tmp_path):
    """The reported defect: a relaunch with temperature=0.5 (and overwrite_output_dir) deleted every checkpoint."""
    ref_dir, ref = reference_run
    crash = crashed_copy(ref_dir, str(tmp_path / "crash"), 2)
    _, state = train_tiny(make_config(tiny_model_dir, crash, max_steps=4, save_steps=2, lora_dropout=0.1,
                                      overwrite_output_dir=True, temperature=0.5, logging_steps=1, eval_steps=3))
    assert losses(state) == losses(ref)  # resumed exactly, not started over
    assert not os.path.exists(os.path.join(crash, ".previous"))


def test_extended_max_steps_resumes_to_the_new_end(reference_run, tiny_model_dir, tmp_path):
    ref_dir, ref = reference_run
    crash = crashed_copy(ref_dir, str(tmp_path / "crash"), 2)
    _, state = train_tiny(make_config(tiny_model_dir, crash, max_steps=7, save_steps=2, lora_dropout=0.1,
                                      overwrite_output_dir=True))
    assert state.global_step == 7
    assert [h["step"] for h in state.log_history] == [1, 2, 3, 4, 5, 6, 7]
    assert losses(state)[:2] == losses(ref)[:2]  # the first two steps are the checkpoint's history
    saved = json.load(open(os.path.join(crash, "trainer_state.json")))
    assert saved["global_step"] == 7 and saved["max_steps"] == 7


def test_changed_learning_rate_refuses_with_a_table_and_touches_nothing(reference_run, tiny_model_dir, tmp_path):
    ref_dir, _ = reference_run
    crash = crashed_copy(ref_dir, str(tmp_path / "crash"), 2)
    before = tree_digest(crash)
    with pytest.raises(ConfigError) as info:
        train_tiny(make_config(tiny_model_dir, crash, max_steps=4, save_steps=2, lora_dropout=0.1,
                               overwrite_output_dir=True, learning_rate=1e-4, seed=3))
    text = str(info.value)
    assert info.value.exit_code == 2
    assert "learning_rate  0.005" in text and "-> 0.0001" in text and "seed" in text
    assert "lora_dropout" not in text  # unchanged keys are not listed
    assert "resume_from_checkpoint: false" in text and os.path.join(crash, "checkpoint-2") in text
    assert tree_digest(crash) == before
    # the first way out: resume it anyway
    _, state = train_tiny(make_config(tiny_model_dir, crash, max_steps=4, lora_dropout=0.1, learning_rate=1e-4,
                                      resume_from_checkpoint=os.path.join(crash, "checkpoint-2")))
    assert state.global_step == 4 and state.log_history[0]["step"] == 1


def test_start_over_moves_the_old_run_aside(reference_run, tiny_model_dir, tmp_path):
    ref_dir, _ = reference_run
    crash = crashed_copy(ref_dir, str(tmp_path / "crash"), 2)
    old = tree_digest(crash)
    _, state = train_tiny(make_config(tiny_model_dir, crash, max_steps=2, learning_rate=1e-4,
                                      resume_from_checkpoint=False))
    assert state.log_history[0]["step"] == 1
    (stamp,) = os.listdir(os.path.join(crash, ".previous"))
    assert tree_digest(os.path.join(crash, ".previous", stamp)) == old


def test_rerunning_a_finished_run_keeps_the_old_adapter(reference_run, tiny_model_dir, tmp_path):
    ref_dir, _ = reference_run
    out = str(tmp_path / "done")
    shutil.copytree(ref_dir, out)
    old = tree_digest(out)
    train_tiny(make_config(tiny_model_dir, out, max_steps=2, overwrite_output_dir=True))
    (stamp,) = os.listdir(os.path.join(out, ".previous"))
    kept = os.path.join(out, ".previous", stamp)
    assert tree_digest(kept) == old  # adapter, checkpoints, trainer_state: all of it, byte for byte
    assert os.path.isfile(os.path.join(kept, "adapter_model.safetensors"))
    # a second start-over keeps both previous runs
    train_tiny(make_config(tiny_model_dir, out, max_steps=1, overwrite_output_dir=True))
    assert len(os.listdir(os.path.join(out, ".previous"))) == 2


def test_continuing_a_finished_run_keeps_its_final_outputs(reference_run, tiny_model_dir, tmp_path):
    ref_dir, _ = reference_run
    out = str(tmp_path / "done")
    shutil.copytree(ref_dir, out)
    adapter = tree_digest(out)["adapter_model.safetensors"]
    _, state = train_tiny(make_config(tiny_model_dir, out, max_steps=6, save_steps=2, lora_dropout=0.1,
                                      resume_from_checkpoint=True))
    assert state.global_step == 6
    (stamp,) = os.listdir(os.path.join(out, ".previous"))
    assert tree_digest(os.path.join(out, ".previous", stamp))["adapter_model.safetensors"] == adapter
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4",
                                                                                  "checkpoint-6"]


def test_resuming_an_older_checkpoint_keeps_the_newer_ones(reference_run, tiny_model_dir, tmp_path):
    ref_dir, _ = reference_run
    out = str(tmp_path / "done")
    shutil.copytree(ref_dir, out)
    newer = tree_digest(os.path.join(out, "checkpoint-4"))
    train_tiny(make_config(tiny_model_dir, out, max_steps=4, save_steps=2, learning_rate=1e-3,
                           resume_from_checkpoint=os.path.join(out, "checkpoint-2")))
    (stamp,) = os.listdir(os.path.join(out, ".previous"))
    assert tree_digest(os.path.join(out, ".previous", stamp, "checkpoint-4")) == newer


def test_eval_does_not_change_the_trajectory(reference_run, tiny_model_dir, tmp_path):
    """Evaluation draws nothing from the global RNG: the same losses with and without it (dropout on)."""
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.sft import SFTObjective
    from lmf.train.resume import plan_resume
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer

    _, ref = reference_run
    cfg = make_config(tiny_model_dir, str(tmp_path / "eval"), max_steps=4, save_steps=2, lora_dropout=0.1,
                      eval_strategy="steps", eval_steps=1)
    runtime = setup_runtime(cfg)
    plan = plan_resume(cfg, runtime)
    set_seed(cfg.training.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, tokenizer, is_trainable=True)
    rows = tokenized_sft_rows(tokenizer, n=24)
    stage = SFTObjective(cfg, model, PadCollator(tokenizer.pad_token_id))
    state = Trainer(cfg, model, tokenizer, stage, rows[:20], runtime, eval_dataset=rows[20:], resume=plan).train()
    assert sum("eval_loss" in h for h in state.log_history) == 4
    assert losses(state) == losses(ref)


def test_save_only_model_resume_says_it_is_approximate(tiny_model_dir, tmp_path, caplog):
    out = str(tmp_path / "som")
    train_tiny(make_config(tiny_model_dir, out, max_steps=2, save_steps=1, save_only_model=True))
    ck = os.path.join(out, "checkpoint-1")
    assert not os.path.exists(os.path.join(ck, "optimizer.pt"))
    assert os.path.isfile(os.path.join(ck, "rng_state_0.pth")) and os.path.isfile(os.path.join(ck, "scheduler.pt"))
    with caplog.at_level("WARNING", logger="lmf"):
        train_tiny(make_config(tiny_model_dir, str(tmp_path / "r"), max_steps=2, resume_from_checkpoint=ck))
    assert "APPROXIMATE" in caplog.text
