"""`lmf sft` end to end through the CLI on the bundled demo config (tiny model, demo data, CPU)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join("examples", "demo_lora_sft.yaml")


def run_lmf(*args: str, env_extra: dict | None = None, timeout: int = 600,
            in_process: bool = True) -> subprocess.CompletedProcess:
    """``lmf *args`` from the repository root: in this process where it runs on one process (lmf.testing.cli)."""
    from lmf.testing.cli import run_lmf as run

    return run(*args, env_extra=env_extra, cwd=REPO_ROOT, timeout=timeout, in_process=in_process)


def history(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)["log_history"]


def test_demo_config_trains_and_adapter_loads(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "demo"
    proc = run_lmf("sft", DEMO, f"output_dir={out}", "max_steps=6", "max_samples=24", "logging_steps=1", "save_steps=3",
                   in_process=False)  # the console entry point itself, in a new interpreter
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params: 16,384 || all params: 352,640" in proc.stderr
    # stderr is a pipe, not a terminal: plain log lines with progress and ETA, no carriage-return redraws
    assert "\r" not in proc.stderr
    assert sum("progress=" in line and " eta=" in line and "loss=" in line for line in proc.stderr.splitlines()) == 6
    curve = [h["loss"] for h in history(out)]
    assert len(curve) == 6 and min(curve[-2:]) < curve[0] - 0.3, curve
    assert (out / "training_loss.png").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-6"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(os.path.join(REPO_ROOT, "examples", "tiny-qwen3")), str(out))
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 2048)
    # relaunching into the finished run without overwrite_output_dir is refused with a one-line error
    again = run_lmf("sft", DEMO, f"output_dir={out}", "max_steps=6", "max_samples=24", "overwrite_output_dir=false")
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr


def test_command_stage_mismatch_is_a_config_error(tmp_path):
    proc = run_lmf("sft", DEMO, "stage=dpo", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "stage" in proc.stderr and "dpo" in proc.stderr and "sft" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_model_path_names_the_key(tmp_path):
    proc = run_lmf("sft", DEMO, f"model_name_or_path={tmp_path}/missing", f"output_dir={tmp_path}/o")
    assert proc.returncode != 0 and "model_name_or_path" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("field,value", [("num_hidden_layers", "two"), ("hidden_size", [64])])
def test_wrong_typed_model_config_field_is_one_line(tmp_path, tiny_model_dir, field, value):
    """A wrong-typed field of the model's config.json: one line naming the file, the field and what is wrong."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config[field] = value
    (model / "config.json").write_text(json.dumps(config))
    proc = run_lmf("sft", DEMO, f"model_name_or_path={model}", f"output_dir={tmp_path}/o", "max_steps=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if "lmf: error:" in ln]
    assert str(model / "config.json") in line and f"'{field}'" in line and "expected int" in line, line


def test_llamafactory_example_yaml_runs_unchanged(tmp_path):
    """LLaMA-Factory's qwen3_lora_sft.yaml (bf16, ddp_timeout, 16 preprocessing / 4 dataloader workers) on CPU."""
    out = tmp_path / "lf"
    proc = run_lmf("sft", os.path.join("tests", "fixtures", "lf_examples", "qwen3_lora_sft.yaml"),
                   "model_name_or_path=examples/tiny-qwen3", "dataset_dir=examples/data", f"output_dir={out}",
                   "max_steps=2", "cutoff_len=128", "max_samples=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16 is set but training runs on CPU: using float32" in proc.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "adapter_model.safetensors").is_file()


def test_train_command_follows_the_config_stage(tmp_path, monkeypatch):
    from lmf import experiment
    from lmf.train import workflow

    monkeypatch.chdir(REPO_ROOT)
    called = []
    monkeypatch.setattr(workflow, "run_training", lambda cfg: called.append((cfg.finetuning.stage, cfg.training.output_dir)))
    experiment.run_experiment([DEMO, "stage=dpo", f"output_dir={tmp_path}"], command="train")
    experiment.run_experiment([DEMO, f"output_dir={tmp_path}"], command="sft")
    experiment.run_experiment([DEMO, "stage=pt", f"output_dir={tmp_path}"], command="sft")
    assert [c[0] for c in called] == ["dpo", "sft", "pt"]
    assert workflow.recipe_of("pt").__name__ == "lmf.train.sft" and workflow.recipe_of("dpo").build_objective
    with pytest.raises(Exception, match="do_train"):
        experiment.run_experiment([DEMO, "do_train=false"], command="sft")
