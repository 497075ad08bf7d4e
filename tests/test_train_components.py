"""Trainer building blocks: optimizer groups, LR schedules, the resumable sharded sampler, reporting, evaluation."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError, DataError, NotAvailableError
from lmf.train.batches import MicroBatchStream, ResumableShardedSampler
from lmf.train.optimizer import create_optimizer, create_scheduler

torch.set_num_threads(1)


def _args(**kw):
    return build_config(kw).training


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _lrs(name: str, total: int = 10, **kw) -> list[float]:
    model = Tiny()
    args = _args(lr_scheduler_type=name, learning_rate=1.0, **kw)
    opt = create_optimizer(model, args)
    sched = create_scheduler(opt, args, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_optimizer_groups_skip_decay_on_bias_and_norm_and_frozen():
    model = Tiny()
    opt = create_optimizer(model, _args(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [model.proj.weight.shape]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # proj.bias, norm.weight, norm.bias
    assert all(p is not model.frozen.weight for g in opt.param_groups for p in g["params"])
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        create_optimizer(model, _args())


def test_schedules_with_warmup():
    linear = _lrs("linear", warmup_steps=2)
    assert linear[:3] == pytest.approx([0.0, 0.5, 1.0]) and linear[-1] == pytest.approx(1 / 8)
    cosine = _lrs("cosine", warmup_ratio=0.2)
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert cosine[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert _lrs("constant") == pytest.approx([1.0] * 10)
    assert _lrs("constant_with_warmup", warmup_steps=4)[:6] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])
    assert min(_lrs("cosine_with_min_lr", total=20)) >= 0.1 - 1e-9


def test_sampler_shards_are_disjoint_deterministic_and_resumable():
    full = [ResumableShardedSampler(10, 2, r, shuffle=True, seed=3) for r in (0, 1)]
    shards = [s.epoch_indices() for s in full]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))
    assert ResumableShardedSampler(10, 2, 0, seed=3).epoch_indices() == shards[0]
    s = ResumableShardedSampler(10, 2, 0, seed=3)
    s.set_epoch(1)
    assert s.epoch_indices() != shards[0]
    s.set_epoch(0, skip=2)
    assert list(s) == shards[0][2:] and len(s) == 3
    padded = [ResumableShardedSampler(5, 2, r, shuffle=False).epoch_indices() for r in (0, 1)]
    assert padded == [[0, 2, 4], [1, 3, 0]]


def test_micro_batch_stream_resumes_at_the_same_batch():
    data = [{"x": i} for i in range(7)]
    collate = lambda rows: [r["x"] for r in rows]  # noqa: E731
    ref = MicroBatchStream(data, collate, 2, ResumableShardedSampler(7, seed=1))
    seq = [next(ref) for _ in range(9)]  # crosses an epoch boundary (4 batches per epoch)
    assert ref.epoch == 2 and ref.batch_in_epoch == 1
    part = MicroBatchStream(data, collate, 2, ResumableShardedSampler(7, seed=1))
    [next(part) for _ in range(5)]
    resumed = MicroBatchStream(data, collate, 2, ResumableShardedSampler(7, seed=1), epoch=part.epoch,
                               batch_in_epoch=part.batch_in_epoch)
    assert [next(resumed) for _ in range(4)] == seq[5:]
    # the global torch RNG is not consumed by creating data iterators
    state = torch.get_rng_state()
    next(MicroBatchStream(data, collate, 2, ResumableShardedSampler(7, seed=1)))
    assert torch.equal(state, torch.get_rng_state())


def _undecodable_image(rows):
    raise DataError("image file 'cat.png' cannot be decoded (truncated)")


def test_data_error_in_a_dataloader_worker_is_its_own_one_line(capsys):
    """A DataError raised by the collator in a DataLoader worker (num_workers=1) reaches the user as lmf's one line
    and exit code, not torch's "Caught DataError in DataLoader worker process 0" with the worker's traceback."""
    from lmf.launcher import guarded

    stream = MicroBatchStream(list(range(4)), _undecodable_image, 2, ResumableShardedSampler(4), num_workers=1)
    assert guarded(next, stream) == DataError.exit_code
    assert capsys.readouterr().err == "lmf: error: image file 'cat.png' cannot be decoded (truncated)\n"
    assert stream.batch_in_epoch == 0


def test_report_to_missing_tracker_is_a_clear_error(tmp_path, monkeypatch):
    from lmf.train.trackers import Reporter

    cfg = build_config({"report_to": "tensorboard", "output_dir": str(tmp_path)})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    with pytest.raises(NotAvailableError, match=r"tensorboard package: pip install tensorboard"):
        Reporter(cfg, is_main=True)
    Reporter(cfg, is_main=False)  # other ranks never touch trackers


def test_plot_loss_writes_png(tmp_path):
    from lmf.train.reporting import plot_loss

    path = plot_loss([{"step": i, "loss": 5.0 / i} for i in range(1, 20)], str(tmp_path))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_loss([{"step": 1}], str(tmp_path / "none")) is None


def test_evaluation_logs_eval_loss(tiny_model_dir, tmp_path):
    from _train_helpers import PadCollator, make_config, tokenized_sft_rows
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.sft import SFTObjective
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer

    cfg = make_config(tiny_model_dir, str(tmp_path), max_steps=4, eval_strategy="steps", eval_steps=2)
    set_seed(0)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, tok, is_trainable=True)
    rows = tokenized_sft_rows(tok, n=16)
    trainer = Trainer(cfg, model, tok, SFTObjective(cfg, model, PadCollator(tok.pad_token_id)), rows[:12], setup_runtime(cfg),
                      eval_dataset=rows[12:])
    state = trainer.train()
    evals = [h for h in state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all(0 < h["eval_loss"] < 20 for h in evals)
    assert trainer.run.wrapped.training  # back in train mode after evaluating


def test_cpu_threads_follow_model_width_unless_set(monkeypatch):
    from types import SimpleNamespace

    from lmf.train.process import pick_cpu_threads

    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        pick_cpu_threads(SimpleNamespace(config=SimpleNamespace(hidden_size=64)), cpu)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        pick_cpu_threads(SimpleNamespace(config=SimpleNamespace(hidden_size=4096)), cpu)
        assert torch.get_num_threads() == 2  # never more than torch's default
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        pick_cpu_threads(SimpleNamespace(config=SimpleNamespace(hidden_size=64)), cpu)
        assert torch.get_num_threads() == 2  # the user's choice wins
    finally:
        torch.set_num_threads(before)


def test_epoch_strategy_saves_and_evaluates_once_per_epoch(tiny_model_dir, tmp_path):
    """20 rows, micro-batch 4 (5 per epoch), accumulation 2: 3 steps an epoch (2 + 2 + 1 micro-batches)."""
    import os

    from _train_helpers import PadCollator, make_config, tokenized_sft_rows
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.sft import SFTObjective
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer

    cfg = make_config(tiny_model_dir, str(tmp_path), max_steps=-1, num_train_epochs=3, save_strategy="epoch",
                      eval_strategy="epoch")
    set_seed(0)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, tok, is_trainable=True)
    rows = tokenized_sft_rows(tok, n=24)
    state = Trainer(cfg, model, tok, SFTObjective(cfg, model, PadCollator(tok.pad_token_id)), rows[:20], setup_runtime(cfg),
                    eval_dataset=rows[20:]).train()
    assert state.global_step == 9  # 3 epochs x ceil(5 / 2): a step never crosses an epoch boundary
    assert state.epoch == 3.0
    assert [h["step"] for h in state.log_history if "eval_loss" in h] == [3, 6, 9]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]


def test_loss_plot_smoothing_scales_with_run_length():
    from lmf.train.reporting import _smooth

    short = [6.0, 5.0, 4.8, 4.8, 4.7, 4.7, 4.7, 4.8]
    smoothed = _smooth(short)
    assert smoothed[0] == short[0]
    assert abs(smoothed[-1] - short[-1]) < 0.1  # a short run's curve follows the data
    long = [5.0 if i % 2 else 4.0 for i in range(200)]
    tail = _smooth(long)[-20:]
    assert max(tail) - min(tail) < 0.2  # a long noisy run is smoothed
    assert _smooth([3.0, 1.0], weight=0.5) == [3.0, 2.0]


@pytest.mark.parametrize("num_items,world,bs", [(7, 2, 2), (5, 2, 2), (1, 3, 4), (12, 4, 3), (9, 1, 4)])
def test_eval_batches_count_each_item_once_and_keep_ranks_in_step(num_items, world, bs):
    from lmf.train.batches import sharded_index_batches

    per_rank = [sharded_index_batches(num_items, world, r, bs) for r in range(world)]
    assert len({len(batches) for batches, _ in per_rank}) == 1  # same number of forwards on every rank
    real = sorted(i for batches, n in per_rank for batch in batches[:n] for i in batch)
    assert real == list(range(num_items))
    assert all(len(b) <= bs for batches, _ in per_rank for b in batches)


def test_training_leaves_no_dataloader_worker_behind(tiny_model_dir, tmp_path):
    """The loop's DataLoader workers stop with it (they are forked: a leftover holds the parent's open files and
    memory for as long as the process that trained lives: a notebook, a test session)."""
    import psutil
    from _train_helpers import make_config, train_tiny

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    train_tiny(make_config(tiny_model_dir, str(tmp_path / "o"), max_steps=2, dataloader_num_workers=1))
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
