"""USE_RAY=1: routed to Ray Train; a clear install hint when Ray is missing; scaling options from the env."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from lmf.ray_launcher import RAY_INSTALL_HINT, ray_scaling_options, require_ray
from lmf.extras.errors import LmfError, NotAvailableError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

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


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when Ray is not installed
    with pytest.raises(NotAvailableError, match=r'pip install "ray\[train\]"'):
        require_ray()


def test_cli_with_use_ray_fails_cleanly_without_ray(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model_name_or_path: /nonexistent\nstage: sft\n")
    hide = tmp_path / "no_ray" / "ray"  # shadows an installed Ray: importing it fails as if it were absent
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, USE_RAY="1", FORCE_TORCHRUN="1",  # Ray wins over torchrun
               PYTHONPATH=os.pathsep.join([str(tmp_path / "no_ray"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "lmf", "sft", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert ("lmf: error: USE_RAY=1 (or a ray_* config key) needs Ray Train, which is not installed: "
            f"{RAY_INSTALL_HINT}") in proc.stderr
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

    def scaling(**kwargs):
        calls["ScalingConfig"] = kwargs
        return types.SimpleNamespace(num_workers=kwargs["num_workers"], placement_strategy=kwargs["placement_strategy"],
                                     total_resources={"CPU": float(kwargs["num_workers"])},
                                     _resources_per_worker_not_none={"CPU": 1.0})

    train.ScalingConfig, train.RunConfig = scaling, record("RunConfig")
    train.get_context = lambda: _FakeContext()
    torch_mod.TorchConfig, torch_mod.TorchTrainer = record("TorchConfig"), TorchTrainer
    ray.is_initialized = lambda: False
    ray.init = record("init")
    ray.cluster_resources = lambda: {"CPU": 2.0}
    ray.nodes = lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}]
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
    assert calls["ScalingConfig"] == {"num_workers": 2, "use_gpu": False, "placement_strategy": "PACK"}
    assert calls["RunConfig"] == {"name": "lmf-sft"} and calls["init"] == {}  # a local cluster, checked before use
    assert calls["TorchConfig"] == {"timeout_s": 77}
    loop_config = calls["TorchTrainer"]["train_loop_config"]
    assert loop_config == {"command": "sft", "args": ["cfg.yaml"], "cwd": str(tmp_path / "driver")}
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    out = tmp_path / "driver" / "out"
    assert (out / "adapter_model.safetensors").is_file()
    import json

    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_llamafactory_ray_keys_map_onto_ray_train(tmp_path):
    from lmf.config.parser import build_config
    from lmf.ray_launcher import config_requests_ray, ray_run_options

    t = build_config({"model_name_or_path": "m", "ray_num_workers": 3, "resources_per_worker": '{"CPU": 2}',
                      "placement_strategy": "SPREAD", "ray_run_name": "exp1",
                      "ray_storage_path": str(tmp_path / "ray")}).training
    assert ray_scaling_options({"NPROC_PER_NODE": "8"}, False, t) == {
        "num_workers": 3, "use_gpu": False, "resources_per_worker": {"CPU": 2}, "placement_strategy": "SPREAD"}
    assert ray_run_options(t, "sft") == {"name": "exp1", "storage_path": str(tmp_path / "ray")}
    gpu = build_config({"model_name_or_path": "m", "resources_per_worker": {"GPU": 1}}).training
    assert ray_scaling_options({}, False, gpu)["use_gpu"] is True
    assert config_requests_ray({"ray_num_workers": 4}) and not config_requests_ray({"ray_num_workers": None})
    assert not config_requests_ray({"model_name_or_path": "m"})
    from lmf.extras.errors import ConfigError

    with pytest.raises(ConfigError, match="resources_per_worker"):
        ray_scaling_options({}, False, build_config({"model_name_or_path": "m", "resources_per_worker": "x"}).training)
    with pytest.raises(ConfigError, match="master_addr"):
        build_config({"model_name_or_path": "m", "master_addr": "10.0.0.1"})


def _ray_config(tiny_model_dir, tmp_path, **extra) -> dict:
    cfg = {
        "model_name_or_path": tiny_model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset_dir": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data"),
        "dataset": "alpaca_en_demo", "template": "qwen", "max_samples": 8, "cutoff_len": 32,
        "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none",
        "preprocessing_cache_dir": str(tmp_path / "cache"), "ray_storage_path": str(tmp_path / "ray"),
    }
    cfg.update(extra)
    return cfg


def _lf_ray_example() -> dict:
    """LLaMA-Factory's train_lora/qwen3_lora_sft_ray.yaml, as its users copy it."""
    import yaml

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                           "lf-examples", "train_lora", "qwen3_lora_sft_ray.yaml")
    with open(example, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _run_cli(cfg_path, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("USE_RAY", "NPROC_PER_NODE", "FORCE_TORCHRUN")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env_extra)
    return subprocess.run([sys.executable, "-m", "lmf", "sft", str(cfg_path)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_llamafactory_ray_example_runs_on_ray_without_use_ray(tiny_model_dir, tmp_path):
    """LF's train_lora/qwen3_lora_sft_ray.yaml: its ray_num_workers alone launches Ray Train (no USE_RAY). The one
    real Ray Train run of the suite (a local cluster): USE_RAY=1 takes the same route (the test without Ray above), its
    worker count from NPROC_PER_NODE x NNODES (test_scaling_uses_nproc_per_node_and_nnodes)."""
    import json

    import yaml

    raw = _lf_ray_example()
    assert raw["ray_num_workers"] == 4
    raw.update(_ray_config(tiny_model_dir, tmp_path, dataset="identity,alpaca_en_demo", template="qwen3_nothink",
                           per_device_train_batch_size=1, gradient_accumulation_steps=2, bf16=False,
                           preprocessing_num_workers=1, dataloader_num_workers=0, ray_run_name="lf-example",
                           ray_init_kwargs={"num_cpus": 4}))  # 4 workers on a 2-core machine: tell Ray it has 4
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    proc = _run_cli(tmp_path / "cfg.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["world_size"] == 4
    assert (tmp_path / "ray" / "lf-example").is_dir()  # ray_storage_path / ray_run_name


def test_a_request_the_cluster_cannot_place_is_refused_saying_both_sides():
    pytest.importorskip("ray.train")
    from ray.train import ScalingConfig

    from lmf.ray_launcher import check_cluster_fits

    one_node = [{"CPU": 2.0, "memory": 8e9}]
    check_cluster_fits(ScalingConfig(num_workers=2), {"CPU": 2.0}, one_node)
    with pytest.raises(LmfError, match=r"asks for 4 worker\(s\) x \{CPU 1\} = \{CPU 4\} \(PACK\), the cluster has "
                                       r"\{CPU 2\} on 1 node\(s\); lower ray_num_workers"):
        check_cluster_fits(ScalingConfig(num_workers=4), {"CPU": 2.0}, one_node)
    with pytest.raises(LmfError, match="GPU"):
        check_cluster_fits(ScalingConfig(num_workers=1, use_gpu=True), {"CPU": 2.0}, one_node)
    two_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    check_cluster_fits(ScalingConfig(num_workers=4), {"CPU": 4.0}, two_nodes)
    with pytest.raises(LmfError, match="STRICT_PACK needs them on one node"):
        check_cluster_fits(ScalingConfig(num_workers=4, placement_strategy="STRICT_PACK"), {"CPU": 4.0}, two_nodes)
    with pytest.raises(LmfError, match="STRICT_SPREAD needs one node per worker"):
        check_cluster_fits(ScalingConfig(num_workers=3, placement_strategy="STRICT_SPREAD"), {"CPU": 4.0}, two_nodes)


@pytest.mark.slow
def test_llamafactory_ray_example_on_a_too_small_cluster_stops_at_once(tiny_model_dir, tmp_path):
    """LF's qwen3_lora_sft_ray.yaml (ray_num_workers: 4) on a 2-CPU local cluster: one line, no endless retry."""
    import time

    import yaml

    raw = _lf_ray_example()
    raw.update(_ray_config(tiny_model_dir, tmp_path, dataset="identity", template="qwen3_nothink", bf16=False,
                           ray_init_kwargs={"num_cpus": 2}))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    proc = _run_cli(tmp_path / "cfg.yaml")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert time.monotonic() - start < 120
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmf: error:")]
    assert "asks for 4 worker(s)" in line and "the cluster has {CPU 2" in line, line
    assert not (tmp_path / "out").exists()
