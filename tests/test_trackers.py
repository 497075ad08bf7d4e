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
    from lmf.train.trackers import resolve_trackers

    found = resolve_trackers(["all"])
    expected = [n for n, m in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"),
                               ("swanlab", "swanlab"), ("trackio", "trackio"))
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


def _swanlab_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] read back from the offline run's .swanlab file with SwanLab's own reader."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    files = glob.glob(os.path.join(str(logdir), "*", "*.swanlab"))
    assert len(files) == 1, files
    reader, out = DataStoreReader(), {}
    reader.open(files[0])
    while (data := reader.scan()) is not None:
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "scalar":
            out.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
    return out


def test_swanlab_offline_and_trackio_get_every_step_and_lark_is_notified(tmp_path, monkeypatch):
    import http.server
    import threading

    from lmf.train.workflow import run_training

    posts = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"code": 0}')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):  # CI machines reach registries by a proxy
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # requests reads the lower-case name first
    out = tmp_path / "out"
    try:
        run_training(build_config(_raw(out, use_swanlab=True, swanlab_mode="offline", swanlab_project="proj",
                                       swanlab_logdir=str(tmp_path / "swanlog"), report_to="trackio",
                                       project="tproj", swanlab_lark_webhook_url=f"http://127.0.0.1:"
                                                                                 f"{server.server_port}/hook")))
        from swanlab.plugin.notification import NotificationCallback

        # SwanLab notifies from its one-thread pool once the run finishes: wait for that before the server stops
        NotificationCallback._executor.submit(lambda: None).result(timeout=60)
    finally:
        server.shutdown()
    history = _history(out)
    scalars = _swanlab_scalars(tmp_path / "swanlog")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert os.path.isfile(out / "swanlab_public_config.json")  # LLaMA-Factory's file of the run's settings

    from trackio.sqlite_storage import SQLiteStorage

    logs = [entry for entry in SQLiteStorage.get_logs("tproj", "tracked") if "train/loss" in entry]
    assert [e["step"] for e in logs] == [1, 2, 3, 4]
    assert [e["train/loss"] for e in logs] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert len(posts) == 1 and posts[0]["msg_type"] == "text" and posts[0]["content"]["text"]


def test_swanlab_cloud_without_a_login_is_a_clear_error_and_all_leaves_it_out(tmp_path, monkeypatch):
    from lmf.train.trackers import Reporter, resolve_trackers, swanlab_needs_login

    monkeypatch.setenv("HOME", str(tmp_path))  # no saved SwanLab credentials
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / ".swanlab"))
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # no terminal to ask on
    cfg = build_config(_raw(tmp_path / "out", report_to="swanlab", swanlab_logdir=str(tmp_path / "logs")))
    with pytest.raises(NotAvailableError, match="swanlab: .*set swanlab_api_key"):
        Reporter(cfg, is_main=True)
    assert swanlab_needs_login(cfg) and "swanlab" not in resolve_trackers(["all"], swanlab_cloud=True)
    assert "swanlab" in resolve_trackers(["all"], swanlab_cloud=False)
