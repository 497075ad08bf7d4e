"""USE_RAY=1: routed to Ray Train; a clear install hint when Ray is missing; scaling options from the env."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from lmf.dist.ray_launcher import RAY_INSTALL_HINT, ray_scaling_options, require_ray
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
