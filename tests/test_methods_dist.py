"""The extra methods under torchrun with 2 CPU processes (gloo): OFT and PiSSA + DFT sharded with FSDP2, Muon and
NEFTune with DDP, each the same trajectory as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lmf.config.parser import build_config

pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")


def _raw(out, **overrides) -> dict:
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=os.path.join(REPO_ROOT, "examples", "data"),
               dataset="identity", template="qwen", cutoff_len=64, max_samples=16, output_dir=str(out), max_steps=3,
               logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=100,
               disable_tqdm=True, disable_shuffling=True, seed=3, report_to="none",
               preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "cache"))
    raw.update(overrides)
    return raw


def _losses(out) -> list[float]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]


def _two_processes(tmp_path, raw: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "lmf", "sft", str(path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.mark.parametrize("name,keys,parallel", [
    ("oft_fsdp", dict(finetuning_type="oft", oft_block_size=16, fsdp="full_shard"), "fsdp"),
    ("pissa_dft_fsdp", dict(finetuning_type="lora", pissa_init=True, pissa_iter=-1, pissa_convert=True,
                            use_dft_loss=True, fsdp="full_shard"), "fsdp"),
    ("muon_ddp", dict(finetuning_type="full", use_muon=True), "ddp"),
])
def test_two_processes_match_one_process(tmp_path, name, keys, parallel):
    from lmf.train.workflow import run_training

    single, multi = tmp_path / "single", tmp_path / "multi"
    run_training(build_config(_raw(single, **keys)))  # micro-batch 4 on one process == 2 x 2 on two
    log = _two_processes(tmp_path, _raw(multi, **dict(keys, per_device_train_batch_size=2)))
    assert f"parallel={parallel}" in log
    assert _losses(multi) == pytest.approx(_losses(single), rel=1e-3, abs=1e-4)
    if keys.get("pissa_convert"):
        assert (multi / "pissa_converted" / "adapter_model.safetensors").is_file()
        assert (multi / "pissa_init" / "adapter_model.safetensors").is_file()


def test_neftune_trains_under_ddp(tmp_path):
    multi = tmp_path / "multi"
    _two_processes(tmp_path, _raw(multi, finetuning_type="lora", neftune_noise_alpha=5.0,
                                  per_device_train_batch_size=2))
    plain = tmp_path / "plain"
    _two_processes(tmp_path, _raw(plain, finetuning_type="lora", per_device_train_batch_size=2))
    assert len(_losses(multi)) == 3 and _losses(multi) != _losses(plain)  # the noise is on
