"""USE_RAY=1: routed to Ray Train; a clear install hint when Ray is missing; scaling options from the env."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from lmf.ray_launcher import RAY_INSTALL_HINT, ray_scaling_options, require_ray
from lmf.extras.errors import LmfError, NotAvailableError

HAS_RAY = importlib.util.find_spec("ray") is not None


def test_scaling_defaults_to_one_cpu_worker():
    assert ray_scaling_options({}, cuda_available=False) == {"num_workers": 1, "use_gpu": False}


def test_scaling_uses_nproc_per_node_and_nnodes():
    assert ray_scaling_options({"NPROC_PER_NODE": "4"}, cuda_available=True) == {"num_workers": 4, "use_gpu": True}
    assert ray_scaling_options({"NPROC_PER_NODE": "2", "NNODES": "3"}, False)["num_workers"] == 6


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_scaling_rejects_bad_worker_counts(value):
    with pytest.raises(LmfError, match="NPROC_PER_NODE"):
        ray_scaling_options({"NPROC_PER_NODE": value}, False)


@pytest.mark.skipif(HAS_RAY, reason="Ray is installed")
def test_missing_ray_is_a_clear_error():
    with pytest.raises(NotAvailableError, match=r'pip install "ray\[train\]"'):
        require_ray()


@pytest.mark.skipif(HAS_RAY, reason="Ray is installed")
def test_cli_with_use_ray_fails_cleanly_without_ray(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model_name_or_path: /nonexistent\nstage: sft\n")
    env = dict(os.environ, USE_RAY="1", FORCE_TORCHRUN="1")  # Ray wins over torchrun
    proc = subprocess.run([sys.executable, "-m", "lmf", "sft", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert f"lmf: error: USE_RAY=1 needs Ray Train, which is not installed: {RAY_INSTALL_HINT}" in proc.stderr
    assert "torchrun" not in proc.stderr  # not relaunched through torchrun
    assert "Traceback" not in proc.stderr


class _FakeContext:
    def get_world_rank(self):
        return 0

    def get_world_size(self):
        return 1

    def get_local_rank(self):
        return 0

    def get_local_world_size(self):
        return 1

    def get_node_rank(self):
        return 0


def _install_fake_ray(monkeypatch, calls: dict, worker_cwd: str) -> None:
    """A stand-in for the ``ray`` package: records the Ray Train objects and runs the worker loop in-process."""
    import types

    ray = types.ModuleType("ray")
    train = types.ModuleType("ray.train")
    torch_mod = types.ModuleType("ray.train.torch")

    def record(name):
        def ctor(*args, **kwargs):
            calls[name] = kwargs
            return (name, kwargs)
        return ctor

    class TorchTrainer:
        def __init__(self, loop, **kwargs):
            calls["TorchTrainer"] = kwargs
            self.loop, self.kwargs = loop, kwargs

        def fit(self):
            os.chdir(worker_cwd)  # Ray starts workers elsewhere; the worker must go back to the driver's cwd
            self.loop(self.kwargs["train_loop_config"])
            return types.SimpleNamespace(error=None)

    train.ScalingConfig, train.RunConfig = record("ScalingConfig"), record("RunConfig")
    train.get_context = lambda: _FakeContext()
    torch_mod.TorchConfig, torch_mod.TorchTrainer = record("TorchConfig"), TorchTrainer
    ray.train, train.torch = train, torch_mod
    for name, mod in (("ray", ray), ("ray.train", train), ("ray.train.torch", torch_mod)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.slow
def test_ray_glue_runs_the_real_training_with_ddp_timeout_and_worker_env(tiny_model_dir, tmp_path, monkeypatch):
    """run_with_ray against a fake Ray: scaling from NPROC_PER_NODE, ddp_timeout -> TorchConfig, rank env, cwd."""
    import yaml

    from lmf.ray_launcher import run_with_ray

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        monkeypatch.setenv(key, "")  # restored after the test (the worker sets them)
        monkeypatch.delenv(key)
    (tmp_path / "driver").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    cfg = {
        "model_name_or_path": tiny_model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset_dir": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data"),
        "dataset": "alpaca_en_demo", "template": "qwen", "max_samples": 8, "cutoff_len": 32,
        "output_dir": "out",  # relative to the driver's cwd
        "max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none", "ddp_timeout": 77,
        "disable_tqdm": True, "preprocessing_cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "driver" / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    calls: dict = {}
    _install_fake_ray(monkeypatch, calls, str(tmp_path / "elsewhere"))
    assert run_with_ray("sft", ["cfg.yaml"], env={"NPROC_PER_NODE": "2"}) == 0
    assert calls["ScalingConfig"] == {"num_workers": 2, "use_gpu": False}
    assert calls["TorchConfig"] == {"timeout_s": 77}
    loop_config = calls["TorchTrainer"]["train_loop_config"]
    assert loop_config == {"command": "sft", "args": ["cfg.yaml"], "cwd": str(tmp_path / "driver")}
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    out = tmp_path / "driver" / "out"
    assert (out / "adapter_model.safetensors").is_file()
    import json

    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason='Ray is optional and not installed (pip install "ray[train]")')
def test_real_ray_train_run(tiny_model_dir, tmp_path):
    """With Ray installed: USE_RAY=1 NPROC_PER_NODE=2 `lmf sft` trains through Ray Train's TorchTrainer."""
    import json

    import yaml

    cfg = {
        "model_name_or_path": tiny_model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset_dir": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data"),
        "dataset": "alpaca_en_demo", "template": "qwen", "max_samples": 8, "cutoff_len": 32,
        "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none",
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, USE_RAY="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lmf", "sft", str(tmp_path / "cfg.yaml")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["world_size"] == 2
