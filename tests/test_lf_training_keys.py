"""transformers' training options that LLaMA-Factory passes through and lmf now implements: the DataLoader keys
(drop_last, persistent workers, prefetch), logging_strategy, eval_on_start and eval_delay, the DDP keys and
torch_empty_cache_steps; each composes with the rest or is refused naming both keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError


def _train(tiny_model_dir, demo_data_dir, tmp_path, **overrides) -> dict:
    from lmf.train.workflow import run_training

    raw = dict(model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
               cutoff_len=64, max_samples=10, output_dir=str(tmp_path / "out"), num_train_epochs=3,
               per_device_train_batch_size=4, learning_rate=5e-3, save_strategy="no", disable_tqdm=True,
               logging_steps=1, preprocessing_cache_dir=str(tmp_path / "cache"), per_device_eval_batch_size=4)
    raw.update(overrides)
    run_training(build_config(raw))
    with open(tmp_path / "out" / "trainer_state.json", encoding="utf-8") as fh:
        return json.load(fh)


def test_drop_last_epoch_logging_eval_on_start_and_delay_in_one_run(tiny_model_dir, demo_data_dir, tmp_path,
                                                                    monkeypatch):
    import lmf.train.trainer as trainer

    released = []
    monkeypatch.setattr(trainer, "release_cached_memory", lambda device: released.append(device.type))
    state = _train(tiny_model_dir, demo_data_dir, tmp_path, dataloader_drop_last=True, logging_strategy="epoch",
                   eval_dataset="identity", eval_strategy="epoch", eval_on_start=True, eval_delay=2,
                   torch_empty_cache_steps=2)
    # 10 samples, micro-batches of 4: the incomplete third is dropped -> 2 steps an epoch, 6 in 3 epochs
    assert state["global_step"] == 6
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [2, 4, 6]  # each epoch's end
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [0, 4, 6]  # start; not before epoch 2
    assert released == ["cpu"] * 3  # every 2 steps (release_cached_memory itself does nothing on CPU)


def test_without_drop_last_every_sample_trains_and_logging_no_logs_nothing(tiny_model_dir, demo_data_dir, tmp_path):
    state = _train(tiny_model_dir, demo_data_dir, tmp_path, logging_strategy="no")
    assert state["global_step"] == 9  # ceil(10 / 4) = 3 micro-batches an epoch
    assert not [h for h in state["log_history"] if "loss" in h]


def test_eval_delay_counts_steps_under_the_steps_strategy():
    from types import SimpleNamespace

    from lmf.train.evaluate import Evaluator

    cfg = build_config({"model_name_or_path": "m", "eval_strategy": "steps", "eval_steps": 2, "eval_delay": 5,
                        "val_size": 0.1})
    evaluator = Evaluator(cfg, eval_dataset=[1], collator=None, runtime=None, dtype=None,
                          state=SimpleNamespace(max_steps=20, early_stopped=False, epoch=0.0))
    assert [s for s in range(1, 12) if evaluator.should_evaluate(s, last=False)] == [6, 8, 10]
    assert evaluator.should_evaluate(3, last=True)


def test_a_persistent_loader_is_kept_across_epochs_and_yields_the_same_batches():
    import torch

    from lmf.train.batches import MicroBatchStream, ResumableShardedSampler

    data = [{"x": torch.tensor([i])} for i in range(10)]

    def collate(samples):
        return {"x": torch.cat([s["x"] for s in samples]), "pid": os.getpid()}

    def take(persistent: bool, n: int = 7):
        stream = MicroBatchStream(data, collate, 4, ResumableShardedSampler(10, seed=3), num_workers=1,
                                  persistent_workers=persistent, prefetch_factor=3, drop_last=True)
        batches, loaders = [], set()
        for _ in range(n):
            batch = next(stream)
            batches.append((stream.epoch, batch["x"].tolist(), batch["pid"]))
            loaders.add(id(stream._loader))
        stream.close()
        return batches, loaders

    kept, kept_loaders = take(True)
    fresh, _ = take(False)
    assert [b[:2] for b in kept] == [b[:2] for b in fresh]  # the same samples in the same order, 2 per epoch
    assert [len(b[1]) for b in kept] == [4] * 7 and kept[-1][0] == 3
    assert len(kept_loaders) == 1 and len({b[2] for b in kept}) == 1  # one DataLoader, one worker process
    assert len({b[2] for b in fresh}) > 1  # a new worker each epoch without it


def test_ddp_options_reach_distributed_data_parallel_or_are_refused_under_fsdp():
    from lmf.dist.plan import ParallelPlan
    from lmf.train.parallel import ddp_options

    args = build_config({"model_name_or_path": "m", "ddp_bucket_cap_mb": 1, "ddp_broadcast_buffers": False,
                         "ddp_static_graph": True}).training
    assert ddp_options(args, ParallelPlan(mode="ddp")) == {"find_unused_parameters": False, "bucket_cap_mb": 1,
                                                           "broadcast_buffers": False, "static_graph": True}
    with pytest.raises(ConfigError, match="config keys 'ddp_bucket_cap_mb' and 'fsdp': the first configures DDP"):
        ddp_options(args, ParallelPlan(mode="fsdp"))
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from torch.nn.parallel import DistributedDataParallel\n"
        "from lmf.config.parser import build_config\n"
        "from lmf.dist.plan import ParallelPlan\n"
        "from lmf.train.parallel import ddp_options\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "args = build_config({'model_name_or_path': 'm', 'ddp_bucket_cap_mb': 1, 'ddp_broadcast_buffers': False,"
        " 'ddp_static_graph': True}).training\n"
        "ddp = DistributedDataParallel(torch.nn.Linear(4, 4), **ddp_options(args, ParallelPlan(mode='ddp')))\n"
        "assert ddp.bucket_bytes_cap == 1024 * 1024 and ddp.broadcast_buffers is False and ddp.static_graph\n"
        "dist.destroy_process_group()\n"
    )
    from lmf.torchrun import find_available_port

    env = dict(os.environ, PORT=str(find_available_port()), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


def test_release_cached_memory_empties_the_accelerator_cache_only(monkeypatch):
    import torch

    from lmf.train.process import release_cached_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    release_cached_memory(torch.device("cpu"))
    release_cached_memory(torch.device("cuda", 0))
    assert calls == ["cuda"]


@pytest.mark.parametrize("keys, message", [
    ({"dataloader_persistent_workers": True}, "'dataloader_persistent_workers' and 'dataloader_num_workers'"),
    ({"dataloader_prefetch_factor": 4}, "'dataloader_prefetch_factor' and 'dataloader_num_workers'"),
    ({"dataloader_drop_last": True, "batching_strategy": "dynamic_batching", "max_steps": 3},
     "'dataloader_drop_last' and 'batching_strategy: dynamic_batching': not implemented together"),
    ({"eval_on_start": True}, "'eval_on_start' needs an eval set"),
    ({"eval_delay": 2, "val_size": 0.1}, "'eval_delay' and 'eval_strategy: no'"),
    ({"dataloader_prefetch_factor": 0, "dataloader_num_workers": 1}, "dataloader_prefetch_factor"),
])
def test_combinations_that_cannot_work_are_refused_naming_both_keys(keys, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config({"model_name_or_path": "m", **keys})


def test_drop_last_with_fewer_samples_than_a_micro_batch_names_the_key(tiny_model_dir, demo_data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'dataloader_drop_last': each of the 1 process\(es\) gets 3 "
                                          r"training samples per epoch, fewer than per_device_train_batch_size 4"):
        _train(tiny_model_dir, demo_data_dir, tmp_path, dataloader_drop_last=True, max_samples=3)
    assert not (tmp_path / "out").exists()  # refused before output_dir is touched
