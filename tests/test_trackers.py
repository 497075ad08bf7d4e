"""report_to against the real libraries: TensorBoard event files read back with TensorBoard's reader, MLflow's
local file store read back with its client, wandb offline run files; only rank 0 reports; a missing package
stops the run before anything is loaded or written."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from lmf.config.parser import build_config
from lmf.extras.errors import NotAvailableError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")


def _raw(out, **overrides) -> dict:
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=os.path.join(REPO_ROOT, "examples", "data"),
               dataset="identity", template="qwen", cutoff_len=64, max_samples=16, output_dir=str(out), max_steps=4,
               logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=100, disable_tqdm=True,
               run_name="tracked", preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "cache"))
    raw.update(overrides)
    return raw


def _history(out) -> list[dict]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h for h in json.load(fh)["log_history"] if "loss" in h]


def test_tensorboard_mlflow_and_wandb_get_every_step(tmp_path, monkeypatch):
    from lmf.train.workflow import run_training

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what lmf sets for its default store; restored after
    out = tmp_path / "out"
    run_training(build_config(_raw(out, report_to="tensorboard,wandb,mlflow")))
    history = _history(out)
    assert [h["step"] for h in history] == [1, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_second"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [1, 2, 3, 4], key
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in history], rel=1e-5), key

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file:" + str(out / "mlruns"))
    runs = client.search_runs(experiment_ids=["0"])
    assert len(runs) == 1 and runs[0].info.run_name == "tracked" and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["learning_rate"] == "0.001" and params["model_name_or_path"] == DEMO_MODEL
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in history], rel=1e-6)

    offline = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(offline) == 1 and os.path.getsize(offline[0]) > 0


def test_report_to_all_uses_every_installed_tracker():
    from lmf.train.reporting import resolve_trackers

    found = resolve_trackers(["all"])
    expected = [n for n, m in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))
                if importlib.util.find_spec(m) is not None]
    assert found == expected


def test_a_missing_tracker_stops_before_anything_is_written(tmp_path, monkeypatch):
    from lmf.train.workflow import run_training

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    out = tmp_path / "out"
    with pytest.raises(NotAvailableError, match=r"pip install mlflow-skinny"):
        run_training(build_config(_raw(out, report_to="mlflow")))
    assert not out.exists()


@pytest.mark.slow
def test_only_rank_0_reports(tmp_path):
    out = tmp_path / "dist"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_raw(out, report_to="tensorboard", per_device_train_batch_size=2)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lmf", "sft", str(path)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(glob.glob(str(out / "runs" / "events.out.tfevents.*"))) == 1
