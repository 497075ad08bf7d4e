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


# ---- the best model: metric_for_best_model, greater_is_better, load_best_model_at_end ----

def _tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_the_final_adapter_is_the_best_checkpoint_and_the_best_one_survives_rotation(tiny_model_dir, demo_data_dir,
                                                                                     tmp_path, caplog):
    import logging

    import torch

    # greater_is_better on the eval loss ranks the first evaluation best (the loss falls as it trains): a best
    # checkpoint that is not the last, on purpose
    with caplog.at_level(logging.INFO, logger="lmf"):
        state = _train(tiny_model_dir, demo_data_dir, tmp_path, max_steps=4, num_train_epochs=1, eval_dataset="identity",
                       eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=1,
                       load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    out = tmp_path / "out"
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2, 3, 4] and evals[0]["eval_loss"] == max(h["eval_loss"] for h in evals)
    assert state["best_metric"] == evals[0]["eval_loss"] and state["best_global_step"] == 1
    assert os.path.basename(state["best_model_checkpoint"]) == "checkpoint-1"
    assert sorted(os.listdir(out / "checkpoint-4")) and sorted(
        p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-4"]  # limit 1 + best
    final, best, last = _tensors(out), _tensors(out / "checkpoint-1"), _tensors(out / "checkpoint-4")
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(final[k], last[k]) for k in last)
    assert "loading the best checkpoint" in caplog.text and "eval_loss=" in caplog.text


def test_by_default_the_lowest_eval_loss_is_the_best_and_recorded_without_loading(tiny_model_dir, demo_data_dir,
                                                                                   tmp_path):
    state = _train(tiny_model_dir, demo_data_dir, tmp_path, max_steps=3, num_train_epochs=1, eval_dataset="identity",
                   eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1)
    evals = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
    best_step = min(evals, key=evals.get)
    assert state["best_metric"] == evals[best_step] and state["best_global_step"] == best_step
    assert os.path.basename(state["best_model_checkpoint"]) == f"checkpoint-{best_step}"


@pytest.mark.parametrize("keys, message", [
    (dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch", eval_dataset="identity"),
     r"save_strategy \(epoch\) must equal eval_strategy \(steps\)"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=3, save_steps=4, eval_dataset="identity"),
     r"save_steps \(4\) must be a whole multiple of eval_steps \(3"),
    (dict(load_best_model_at_end=True, eval_strategy="steps"), r"'load_best_model_at_end' needs evaluations"),
])
def test_a_best_model_without_a_checkpoint_per_evaluation_is_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", **keys})


def test_metric_defaults_follow_transformers_and_an_unknown_metric_names_the_key(tiny_model_dir, demo_data_dir,
                                                                                  tmp_path):
    from lmf.extras.errors import LmfError

    t = build_config({"model_name_or_path": "m", "metric_for_best_model": "accuracy"}).training
    assert (t.metric_for_best_model, t.greater_is_better) == ("eval_accuracy", True)
    t = build_config({"model_name_or_path": "m"}).training
    assert (t.metric_for_best_model, t.greater_is_better) == ("eval_loss", False)
    with pytest.raises(LmfError, match=r"'metric_for_best_model': the evaluation reports no 'eval_bleu' \(it "
                                       r"reports eval_loss"):
        _train(tiny_model_dir, demo_data_dir, tmp_path, max_steps=2, num_train_epochs=1, eval_dataset="identity",
               eval_strategy="steps", eval_steps=1, metric_for_best_model="bleu")


def test_load_best_model_at_end_under_fsdp_is_refused_naming_both():
    from lmf.dist.plan import plan_parallelism
    from lmf.dist.runtime import DistInfo
    from lmf.train.trainer import Trainer

    cfg = build_config({"model_name_or_path": "m", "load_best_model_at_end": True, "eval_strategy": "steps",
                        "save_steps": 10, "eval_steps": 10, "eval_dataset": "identity", "fsdp": "full_shard"})
    plan = plan_parallelism(cfg, 2, announce=False)  # what two processes would run
    assert plan.mode == "fsdp"
    runtime = DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2, device=None, backend="gloo")
    with pytest.raises(ConfigError, match=r"'load_best_model_at_end' under FSDP sharding .* not implemented"):
        Trainer(cfg, model=None, tokenizer=None, objective=None, train_dataset=[1], runtime=runtime, plan=plan)


def test_full_determinism_turns_on_deterministic_algorithms_and_reruns_are_identical(tiny_model_dir, demo_data_dir,
                                                                                       tmp_path, monkeypatch):
    import torch

    for name in ("CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    try:
        runs = [_train(tiny_model_dir, demo_data_dir, tmp_path / str(i), max_steps=3, num_train_epochs=1,
                       full_determinism=True) for i in range(2)]
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
    losses = [[h["loss"] for h in r["log_history"] if "loss" in h] for r in runs]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_the_torch_profiler_writes_a_trace_of_the_scheduled_steps(tiny_model_dir, demo_data_dir, tmp_path):
    import glob
    import gzip

    _train(tiny_model_dir, demo_data_dir, tmp_path, max_steps=4, num_train_epochs=1, enable_torch_profiler=True,
           profiler_wait_steps=1, profiler_warmup_steps=1, profiler_active_steps=1, profiler_with_stack=False)
    traces = glob.glob(str(tmp_path / "out" / "profiler" / "rank_0" / "*.pt.trace.json*"))
    assert len(traces) == 1, traces  # one cycle (repeat 1): steps 3 recorded
    opener = gzip.open if traces[0].endswith(".gz") else open
    with opener(traces[0], "rt", encoding="utf-8") as fh:
        events = json.load(fh)["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names or "aten::addmm" in names  # the model's matmuls
    assert "ProfilerStep#2" in names and not any(n and n.startswith("ProfilerStep#0") for n in names)
    assert any(e.get("name") == "[memory]" for e in events)  # profiler_profile_memory (default true)


def test_torch_compile_trains_like_eager_and_saves_the_same_files(tiny_model_dir, demo_data_dir, tmp_path, caplog):
    """The eager backend: torch.compile's tracing of every module into graphs, run without code generation
    (inductor, which reorders float sums, is measured in bench/bench_compile.py: its C++ compilation takes minutes
    on this machine)."""
    import logging

    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("eager", {}), ("compiled", {"torch_compile": True, "torch_compile_backend": "eager"})):
        with caplog.at_level(logging.INFO, logger="lmf"):
            state = _train(tiny_model_dir, demo_data_dir, tmp_path / name, max_steps=3, num_train_epochs=1, **extra)
        runs[name] = ([h["loss"] for h in state["log_history"] if "loss" in h],
                      load_file(str(tmp_path / name / "out" / "adapter_model.safetensors")))
    assert "torch_compile: 2 decoder blocks compiled, 8 modules (backend eager)" in caplog.text
    assert runs["compiled"][0] == pytest.approx(runs["eager"][0], rel=1e-5)
    assert runs["compiled"][1].keys() == runs["eager"][1].keys()  # the same adapter file, names and all


def test_switched_keys_warn_when_their_switch_is_off(caplog):
    import logging

    logging.getLogger("lmf").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="lmf"):
            build_config({"model_name_or_path": "m", "torch_compile_mode": "max-autotune", "profiler_repeat": 2,
                          "eaft_alpha": 0.5, "buffer_size": 128})
            text = caplog.text
            caplog.clear()
            build_config({"model_name_or_path": "m", "torch_compile": True, "torch_compile_mode": "max-autotune"})
    finally:
        logging.getLogger("lmf").propagate = False
    assert "'torch_compile_mode' has no effect without torch_compile: true" in text
    assert "'profiler_repeat' has no effect without enable_torch_profiler: true" in text
    assert "'eaft_alpha' has no effect without use_eaft_loss: true" in text
    assert "'buffer_size' has no effect without streaming: true" in text
    assert "has no effect" not in caplog.text  # not with the switch on
