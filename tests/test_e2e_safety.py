"""A run that fails before training never touches the previous run in output_dir (through the CLI)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from test_e2e_sft import DEMO, run_lmf
from test_train_safety import tree_digest

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

BASE = ("max_steps=3", "max_samples=16", "save_steps=2", "logging_steps=1", "preprocessing_num_workers=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished demo LoRA SFT run (adapter, checkpoints, loss plot) and a data folder with a malformed record."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    proc = run_lmf("sft", DEMO, f"output_dir={out}", *BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    data = root / "data"
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "data"), data)
    (data / "broken.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"},
                                                  {"instruction": "no answer here"}]))
    info = json.loads((data / "dataset_info.json").read_text())
    info["broken"] = {"file_name": "broken.json"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return out, data


def failing_runs(data):
    """(description, overrides, expected text in stderr) of runs that fail before any training step."""
    return [
        ("bad dataset name", ["dataset=nosuch"], "nosuch"),
        ("bad template", ["template=nosuch"], "template"),
        ("bad key value", ["lr_scheduler_type=sometimes"], "lr_scheduler_type"),
        ("bad lora target", ["lora_target=no_such_module"], "no_such_module"),
        ("missing model path", ["model_name_or_path=/nonexistent/model"], "model_name_or_path"),
        ("malformed record", [f"dataset_dir={data}", "dataset=broken"], "record 1"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_failed_run_leaves_the_finished_run_byte_identical(finished_run, index, tmp_path):
    master, data = finished_run
    out = tmp_path / "run"
    shutil.copytree(master, out)
    name, overrides, expected = failing_runs(data)[index]
    before = tree_digest(out)
    proc = run_lmf("sft", DEMO, f"output_dir={out}", *BASE, *overrides)
    assert proc.returncode != 0, name
    assert expected in proc.stderr, (name, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, name
    assert "starting over" not in proc.stderr and "moved to" not in proc.stderr, name
    assert tree_digest(out) == before, name
    assert not (out / ".previous").exists()


@pytest.mark.slow
def test_failed_torchrun_run_leaves_the_finished_run_byte_identical(finished_run, tmp_path):
    master, data = finished_run
    out = tmp_path / "run"
    shutil.copytree(master, out)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    before = tree_digest(out)
    for name, overrides, expected in [failing_runs(data)[i] for i in (0, 3, 5)]:
        proc = run_lmf("sft", DEMO, f"output_dir={out}", *BASE, *overrides, env_extra=env)
        assert proc.returncode != 0, name
        assert expected in proc.stderr, (name, proc.stderr[-3000:])
        assert tree_digest(out) == before, name
    assert not (out / ".previous").exists()
