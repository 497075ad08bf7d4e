"""The one training loop shared by SFT, DPO and RM.

A *stage* supplies ``collator(list[dict]) -> batch`` and
``compute_loss(model, batch) -> (loss_sum, num_items, metrics)`` where ``loss_sum`` is a *sum* over
``num_items`` (label tokens for SFT, pairs for DPO/RM). The loop wraps the model in a small
``nn.Module`` whose ``forward(batch)`` calls the stage (:func:`_make_loss_module`) and hands *that*
to DDP/FSDP2 (so their hooks fire), then:

- accumulates ``gradient_accumulation_steps`` micro-batches, back-propagating ``loss_sum``;
- all-reduces the item count of the window and scales the gradients by ``world_size / items``, so the
  step optimises the mean over every label token of the window on every rank (not a mean of means);
- clips, steps AdamW and the schedule, logs on rank 0, checkpoints atomically every ``save_steps``.

Entry points: :func:`setup_runtime` (the one place the process group is created) and
:class:`Trainer`. Resume rules: :mod:`lmf.train.resume`.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from lmf.dist.fault_injection import fault_point
from lmf.extras.errors import ConfigError, LmfError
from lmf.extras.logging import get_logger
from lmf.train import checkpoint as ckpt
from lmf.train.resume import (  # noqa: F401  (resolve_resume_checkpoint re-exported for the stages)
    ResumePlan,
    prepare_output_dir,
    resolve_resume_checkpoint,
    resume_fingerprint,
    trajectory_config,
)

if TYPE_CHECKING:
    import torch

    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo

logger = get_logger(__name__)


class Stage(Protocol):
    """What a training stage plugs into the loop.

    Optional hooks (looked up with ``getattr``):

    - ``save_extra(out_dir, state_dict) -> state_dict``: called on rank 0 before the model is saved
      (checkpoints and final output) with the full CPU state dict of the HF model (trainable
      params only for LoRA); writes stage files (e.g. a value head) and returns what to save as model.
    - ``load_extra(model, checkpoint_dir) -> set[str]``: on resume, loads those files into the
      unwrapped model and returns the parameter names it restored.
    """

    name: str
    collator: Callable[[list[dict]], dict]

    def compute_loss(self, model, batch: dict) -> tuple["torch.Tensor", "torch.Tensor", dict[str, float]]:
        ...


def setup_runtime(cfg: "LmfConfig") -> "DistInfo":
    """Create the process group (under torchrun) and pick the device: the single place for runtime hooks."""
    from lmf.dist.runtime import init_distributed

    t = cfg.training
    info = init_distributed(timeout_s=t.ddp_timeout, backend=t.ddp_backend, use_cpu=t.use_cpu)
    apply_tf32(t.tf32, info.device)
    if info.is_distributed:
        logger.info("distributed: world_size=%d backend=%s device=%s", info.world_size, info.backend, info.device)
        from lmf.dist.fingerprint import check_consistency

        check_consistency(cfg.config_hash())  # every rank fails fast if nodes differ in versions or config
    return info


def apply_tf32(tf32: Optional[bool], device) -> None:
    """``tf32``: allow (or forbid) TF32 matmuls and convolutions on CUDA; on CPU it has nothing to change."""
    if tf32 is None:
        return
    if device.type != "cuda":
        logger.info("tf32: %s has no effect on %s (TF32 is a CUDA matmul mode)", tf32, device.type)
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    logger.info("tf32: TF32 matmuls %s", "allowed" if tf32 else "disabled")


def pick_cpu_threads(model, device) -> None:
    """On CPU without OMP_NUM_THREADS, use about one thread per 256 hidden units (up to the core count).

    torch defaults to every core; for small models the threads mostly wait on each other (a
    hidden-64 model trains ~3x slower with 2 threads than with 1 on a 2-core machine).
    """
    import torch

    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 0
    threads = max(1, min(torch.get_num_threads(), hidden // 256))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("CPU training with %d torch thread(s) for hidden size %d (set OMP_NUM_THREADS to override)",
                    threads, hidden)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- the loop

def _make_loss_module(model, compute_loss):
    from torch import nn

    class _LossModule(nn.Module):
        """Wraps the HF model; ``forward(batch)`` returns the stage's loss pieces (so DDP/FSDP hooks fire)."""

        def __init__(self, model, compute_loss):
            super().__init__()
            self.model = model
            self._compute_loss = compute_loss

        def forward(self, batch):
            return self._compute_loss(self.model, batch)

    return _LossModule(model, compute_loss)


@dataclass
class TrainState:
    """Progress saved in trainer_state.json (and restored on resume)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    data_epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    micro_batch_size: int = 1
    log_history: list = field(default_factory=list)
    log_window: list = field(default_factory=list)  # step losses since the last log entry
    resume_fingerprint: str = ""
    trajectory: dict = field(default_factory=dict)  # the training keys (lmf.train.resume.TRAJECTORY_KEYS)
    best_eval_loss: Optional[float] = None  # early_stopping_steps: the best eval_loss so far
    evals_without_improvement: int = 0
    early_stopped: bool = False
    finished: bool = False


class Trainer:
    """Runs one stage to ``max_steps`` (or ``num_train_epochs``) with checkpoints and exact resume."""

    def __init__(self, cfg: "LmfConfig", model, tokenizer, stage: Stage, train_dataset, runtime: "DistInfo",
                 eval_dataset=None, resume: Optional[ResumePlan] = None):
        self.cfg, self.args = cfg, cfg.training
        self.model, self.tokenizer, self.stage = model, tokenizer, stage
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.runtime, self.resume = runtime, resume or ResumePlan()
        self.resume_from = self.resume.checkpoint
        self.is_lora = cfg.finetuning.finetuning_type == "lora"
        self.state = TrainState(world_size=runtime.world_size, micro_batch_size=cfg.training.per_device_train_batch_size,
                                resume_fingerprint=resume_fingerprint(cfg), trajectory=trajectory_config(cfg))
        if len(train_dataset) == 0:
            raise LmfError("the training dataset is empty")

    # ------------------------------------------------------------------ setup
    def _compute_dtype(self) -> Optional["torch.dtype"]:
        """The autocast dtype: bf16/fp16 on CUDA; none on CPU and with pure_bf16 (the weights already are bf16)."""
        import torch

        if self.runtime.device.type != "cuda" or self.cfg.finetuning.pure_bf16:
            return None
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    def _build_stream(self):
        from lmf.train.batches import MicroBatchStream, ResumableShardedSampler

        sampler = ResumableShardedSampler(
            len(self.train_dataset), self.runtime.world_size, self.runtime.rank,
            shuffle=not self.cfg.finetuning.disable_shuffling, seed=self.args.data_seed,
        )
        workers = self.args.dataloader_num_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if workers > cores:
            logger.info("dataloader_num_workers=%d capped at the %d available CPU cores", workers, cores)
            workers = cores
        return MicroBatchStream(
            self.train_dataset, self.stage.collator, self.args.per_device_train_batch_size, sampler,
            num_workers=workers, pin_memory=self.runtime.device.type == "cuda",
        )

    def _total_steps(self, batches_per_epoch: int) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        # a step never crosses an epoch boundary (the last step of an epoch may take fewer micro-batches),
        # as in transformers/LLaMA-Factory: num_train_epochs: 1 trains exactly one pass over the data
        steps_per_epoch = math.ceil(batches_per_epoch / self.args.gradient_accumulation_steps)
        total = math.ceil(self.args.num_train_epochs * steps_per_epoch)
        if total <= 0:
            raise ConfigError("nothing to train: set max_steps > 0 or num_train_epochs > 0")
        return total

    def _save_steps(self) -> int:
        s = self.args.save_steps
        return max(1, math.ceil(s * self.state.max_steps)) if 0 < s < 1 else max(1, int(s))

    def _setup(self) -> None:
        import torch

        from lmf.train.optim import create_optimizer, create_scheduler
        from lmf.dist.plan import plan_parallelism
        from lmf.train.parallel import wrap

        pick_cpu_threads(self.model, self.runtime.device)
        self.stream = self._build_stream()
        self.state.max_steps = self._total_steps(self.stream.batches_per_epoch)
        if self.resume_from:
            self._load_model_weights(self.resume_from)
        self.plan = plan_parallelism(self.cfg, self.runtime.world_size)
        self.loss_module = _make_loss_module(self.model, self.stage.compute_loss)
        self.wrapped = wrap(self.loss_module, self.plan, self.runtime.device, self._compute_dtype(),
                            self.args.ddp_find_unused_parameters)
        self.trainable = [p for p in self.loss_module.parameters() if p.requires_grad]
        self.optimizer = create_optimizer(self.loss_module, self.args)
        self.scheduler = create_scheduler(self.optimizer, self.args, self.state.max_steps)
        dtype = self._compute_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and self.plan.mode != "fsdp" else None
        if self.resume_from:
            self._load_training_state(self.resume_from)

    def _autocast(self):
        import torch

        dtype = self._compute_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.runtime.device.type, dtype=dtype)

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict) -> dict:
        dev = self.runtime.device
        return {k: (v.to(dev, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}

    def train(self) -> TrainState:
        """Train to the last step, then save the final model and state (rank 0).

        A SIGTERM/SIGINT (:mod:`lmf.train.preemption`) ends the run after the current step with a
        checkpoint and :class:`~lmf.train.preemption.TrainingInterrupted`.
        """
        import torch

        from lmf.dist.runtime import all_reduce_sum
        from lmf.train.parallel import gradient_sync
        from lmf.train.preemption import StopRequest, TrainingInterrupted, agreed_signal
        from lmf.train.reporting import Progress, Reporter

        self._setup()
        # every check has passed (config, data, template, model, runtime, resume state): only now is output_dir touched
        prepare_output_dir(self.cfg, self.resume, self.runtime)
        args, st = self.args, self.state
        ga = args.gradient_accumulation_steps
        reporter = Reporter(self.cfg, self.runtime.is_main)
        self._log_start()
        if self.cfg.finetuning.plot_loss and self.runtime.is_main:
            from lmf.train.reporting import matplotlib_available

            if not matplotlib_available():  # said now, not after hours of training
                logger.warning("plot_loss: matplotlib is not installed (pip install 'lmf[plot]'): "
                               "training_loss.png will not be written")
        progress = Progress(st.max_steps, st.global_step, self.runtime.is_main and not args.disable_tqdm)
        save_every = self._save_steps()
        window_start, window_tokens = time.perf_counter(), 0
        epochs_done = self._epochs_done()
        stop = StopRequest().install()
        self.wrapped.train()
        try:
            while st.global_step < st.max_steps:
                step_start = time.perf_counter()
                acc = torch.zeros(3, dtype=torch.float64, device=self.runtime.device)  # loss_sum, items, input tokens
                metric_sums: dict[str, float] = {}
                n_micro = min(ga, self.stream.batches_left_in_epoch)
                for micro in range(n_micro):
                    batch = self._to_device(next(self.stream))
                    with gradient_sync(self.wrapped, self.plan, enabled=micro == n_micro - 1), self._autocast():
                        loss_sum, num_items, metrics = self.wrapped(batch)
                    (self.scaler.scale(loss_sum) if self.scaler else loss_sum).backward()
                    acc[0] += loss_sum.detach().double()
                    acc[1] += num_items.detach().double() if hasattr(num_items, "detach") else float(num_items)
                    mask = batch.get("attention_mask")
                    acc[2] += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
                    for k, v in metrics.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                # one all-reduce: the window's sums, the stop requests of every rank, the stage metrics
                stats = torch.cat([acc, torch.tensor(stop.flags(), dtype=torch.float64, device=acc.device),
                                   torch.tensor([metric_sums[k] for k in sorted(metric_sums)], dtype=torch.float64,
                                                device=acc.device)])
                all_reduce_sum(stats)
                loss_total, items, tokens = stats[0].item(), stats[1].item(), stats[2].item()
                stop_signal = agreed_signal(stats[3].item(), stats[4].item())
                grad_norm = self._optimizer_step(items)
                st.global_step += 1
                fault_point("step", st.global_step)  # test-only hooks (inert unless LMF_TEST_* is set)
                st.tokens_seen += int(tokens)
                st.data_epoch, st.batch_in_epoch = self.stream.epoch, self.stream.batch_in_epoch
                st.epoch = round(self.stream.epoch_float, 4)
                step_loss = loss_total / max(items, 1.0)
                st.log_window.append(step_loss)  # in the state: a resumed run logs the same averages
                window_tokens += int(tokens)
                lr = self.scheduler.get_last_lr()[0]
                progress.update(step_loss, lr, tokens / max(time.perf_counter() - step_start, 1e-9))
                n_div = n_micro * self.runtime.world_size
                step_metrics = {k: stats[5 + i].item() / n_div for i, k in enumerate(sorted(metric_sums))}
                is_last = st.global_step >= st.max_steps
                if st.global_step % args.logging_steps == 0 or is_last or (args.logging_first_step and st.global_step == 1):
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    entry = {"step": st.global_step, "epoch": st.epoch, "loss": round(sum(st.log_window) / len(st.log_window), 6),
                             "lr": lr, "grad_norm": round(grad_norm, 6), "tokens_per_second": round(window_tokens / elapsed, 1)}
                    entry.update({k: round(v, 6) for k, v in step_metrics.items()})
                    self._record(entry, reporter, progress.suffix())
                    st.log_window, window_tokens, window_start = [], 0, time.perf_counter()
                epoch_ended = self._epochs_done() > epochs_done
                epochs_done = self._epochs_done()
                if is_last:
                    break
                if stop_signal is not None:
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(stop_signal, st.global_step, path)
                if self.eval_dataset is not None and self._eval_due(is_last, epoch_ended):
                    results = self.evaluate()
                    self._record({"step": st.global_step, **results}, reporter)
                    if self._should_stop_early(results["eval_loss"]):
                        break
                if self._save_due(save_every, epoch_ended):
                    self.save_checkpoint()
        finally:
            stop.restore()
            progress.close()
            if sys.exc_info()[0] is not None:
                reporter.close()
        if self.eval_dataset is not None and not st.early_stopped and self._eval_due(True, False):
            self._record({"step": st.global_step, **self.evaluate()}, reporter)
        st.finished = True
        if self.args.save_strategy != "no":
            self.save_checkpoint()
        self.save_final()
        reporter.close()
        return st

    def _should_stop_early(self, eval_loss: float) -> bool:
        """``early_stopping_steps: N``: stop once eval_loss has not improved on its best for N evaluations in a
        row (transformers' EarlyStoppingCallback, which LLaMA-Factory uses). The state survives a resume."""
        patience = self.cfg.finetuning.early_stopping_steps
        if not patience:
            return False
        st = self.state
        if st.best_eval_loss is None or eval_loss < st.best_eval_loss:
            st.best_eval_loss, st.evals_without_improvement = eval_loss, 0
            return False
        st.evals_without_improvement += 1
        if st.evals_without_improvement < patience:
            return False
        st.early_stopped = True
        logger.info("early stopping at step %d: eval_loss has not improved on %.6g for %d evaluation(s) "
                    "(early_stopping_steps)", st.global_step, st.best_eval_loss, patience)
        return True

    def _epochs_done(self) -> int:
        """Completed passes over the data (an epoch counts as done once its last micro-batch is consumed)."""
        return self.stream.epoch + (1 if self.stream.batch_in_epoch >= self.stream.batches_per_epoch else 0)

    def _eval_due(self, is_last: bool, epoch_ended: bool) -> bool:
        strategy = self.args.eval_strategy
        if strategy == "no":
            return is_last and self.args.do_eval
        if strategy == "steps":
            every = self.args.eval_steps or self.args.logging_steps
            every = max(1, math.ceil(every * self.state.max_steps)) if 0 < every < 1 else max(1, int(every))
            return self.state.global_step % every == 0 or is_last
        return is_last or epoch_ended

    def _save_due(self, save_every: int, epoch_ended: bool) -> bool:
        if self.args.save_strategy == "steps":
            return self.state.global_step % save_every == 0
        return self.args.save_strategy == "epoch" and epoch_ended

    def _optimizer_step(self, items: float) -> float:
        """Normalise grads to the mean over the window's items, clip, step; return the grad norm."""
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        factor = self.runtime.world_size / max(items, 1.0)  # DDP/FSDP average over ranks; undo, divide by all items
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)
        grad_norm = 0.0
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @contextlib.contextmanager
    def _eval_mode(self):
        self.wrapped.eval()
        try:
            yield
        finally:
            self.wrapped.train()

    def evaluate(self) -> dict[str, float]:
        """Mean loss (and stage metrics) over the eval set: ``eval_loss``, ``eval_<metric>``; with several eval
        sets (``eval_on_each_dataset``) ``eval_<name>_loss`` per set and their mean as ``eval_loss``."""
        if not isinstance(self.eval_dataset, dict):
            return self._evaluate_one(self.eval_dataset, "eval")
        out: dict[str, float] = {}
        for name, dataset in self.eval_dataset.items():
            out.update(self._evaluate_one(dataset, f"eval_{name}"))
        losses = [out[f"eval_{name}_loss"] for name in self.eval_dataset]
        out["eval_loss"] = round(sum(losses) / len(losses), 6)
        return out

    def _evaluate_one(self, dataset, prefix: str) -> dict[str, float]:
        """``{prefix}_loss`` (sum of losses / sum of items across ranks) and the stage's item-weighted metrics."""
        import torch

        from lmf.dist.runtime import all_reduce_sum
        from lmf.train.batches import sharded_index_batches

        batches, num_real = sharded_index_batches(len(dataset), self.runtime.world_size, self.runtime.rank,
                                                  self.args.per_device_eval_batch_size)
        # its own generator: evaluating never draws from the global RNG, so eval keys cannot change training
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self.stage.collator,
                                             generator=torch.Generator())
        acc = torch.zeros(2, dtype=torch.float64, device=self.runtime.device)
        metric_sums: dict[str, float] = {}  # stage metrics weighted by items
        with self._eval_mode(), torch.no_grad():
            for i, batch in enumerate(loader):
                with self._autocast():
                    loss_sum, items, metrics = self.wrapped(self._to_device(batch))
                if i >= num_real:
                    continue  # a filler forward that keeps sharded ranks in step; not counted
                acc[0] += loss_sum.double()
                acc[1] += items.double() if hasattr(items, "double") else float(items)
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * float(items)
        keys = sorted(metric_sums)
        acc = torch.cat([acc, torch.tensor([metric_sums[k] for k in keys], dtype=torch.float64, device=acc.device)])
        all_reduce_sum(acc)
        n = max(acc[1].item(), 1.0)
        return {f"{prefix}_loss": round(acc[0].item() / n, 6),
                **{f"{prefix}_{k}": round(acc[2 + i].item() / n, 6) for i, k in enumerate(keys)}}

    def _record(self, entry: dict, reporter, suffix: str = "") -> None:
        self.state.log_history.append(entry)
        if self.runtime.is_main:
            reporter.log(entry, self.state.global_step)
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
            logger.info("%s%s", line, f" {suffix}" if suffix else "")

    def _log_start(self) -> None:
        from lmf.model.adapter import count_parameters

        a, st = self.args, self.state
        trainable, total = count_parameters(self.model)
        logger.info(
            "training: %d examples, %d steps, micro-batch %d x accumulation %d x %d process(es) = %d per step, "
            "%d trainable of %d params, parallel=%s%s",
            len(self.train_dataset), st.max_steps, a.per_device_train_batch_size, a.gradient_accumulation_steps,
            self.runtime.world_size,
            a.per_device_train_batch_size * a.gradient_accumulation_steps * self.runtime.world_size,
            trainable, total, self.plan.mode,
            f", resuming at step {st.global_step} from {self.resume_from}" if self.resume_from else "",
        )

    # ------------------------------------------------------------------ saving
    def _full_state_dict(self, trainable_only: bool) -> dict:
        """Full (unsharded, CPU) state dict of the HF model; a collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        sd = get_model_state_dict(self.loss_module, options=options)
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}

    def _write_model(self, out_dir: str, final: bool) -> None:
        """Adapter (LoRA) or full model + tokenizer into ``out_dir`` (collective; rank 0 writes)."""
        sd = self._full_state_dict(trainable_only=self.is_lora)
        if not self.runtime.is_main:
            return
        save_extra = getattr(self.stage, "save_extra", None)
        if save_extra is not None:
            sd = save_extra(out_dir, sd)
        if self.is_lora:
            self.model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        else:
            if final:
                dtype = getattr(self.model.config, "dtype", None)
                if dtype is not None and not isinstance(dtype, str):
                    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
            self.model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_dir)

    def save_checkpoint(self) -> Optional[str]:
        """Write ``checkpoint-{step}`` atomically: model, optimizer, scheduler, per-rank RNG, state."""
        import torch
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from lmf.dist.runtime import barrier, is_dist

        out, step = self.args.output_dir, self.state.global_step
        final_dir = os.path.join(out, f"{ckpt.CHECKPOINT_PREFIX}{step}")
        tmp = ckpt.make_temp_dir(out, f"checkpoint-{step}") if self.runtime.is_main else None
        self._write_model(tmp, final=False)
        fault_point("save", step)  # test-only kill hook: leaves a half-written checkpoint behind
        rng = ckpt.capture_rng_state()
        rngs = [None] * self.runtime.world_size if self.runtime.is_main else None
        if is_dist():
            dist.gather_object(rng, rngs, dst=0)
        else:
            rngs = [rng]
        optim_sd = None
        if not self.args.save_only_model:
            optim_sd = get_optimizer_state_dict(self.loss_module, self.optimizer,
                                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.runtime.is_main:
            if optim_sd is not None:
                torch.save(optim_sd, os.path.join(tmp, ckpt.OPTIMIZER_NAME))
                if self.scaler is not None:
                    torch.save(self.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
            # the schedule and RNG states are tiny: saved even with save_only_model
            torch.save(self.scheduler.state_dict(), os.path.join(tmp, ckpt.SCHEDULER_NAME))
            for rank, state in enumerate(rngs):
                torch.save(state, os.path.join(tmp, ckpt.rng_state_name(rank)))
            ckpt.write_json(os.path.join(tmp, ckpt.STATE_NAME), asdict(self.state))
            ckpt.commit_dir(tmp, final_dir)
            ckpt.rotate_checkpoints(out, self.args.save_total_limit, keep=final_dir)
            logger.info("saved %s", final_dir)
        barrier()
        return final_dir

    def save_final(self) -> None:
        """Final model/adapter, tokenizer, trainer_state.json (last) and the loss plot in output_dir."""
        from lmf.dist.runtime import barrier

        out = self.args.output_dir
        tmp = ckpt.make_temp_dir(out, "final") if self.runtime.is_main else None
        self._write_model(tmp, final=True)
        if self.runtime.is_main:
            if self.cfg.finetuning.plot_loss:
                from lmf.train.reporting import plot_loss

                plot_loss(self.state.log_history, tmp)
            ckpt.write_json(os.path.join(tmp, ckpt.STATE_NAME), asdict(self.state))
            ckpt.commit_files(tmp, out)
            logger.info("saved the %s to %s", "adapter" if self.is_lora else "model", out)
        barrier()

    # ------------------------------------------------------------------ resume
    def _load_model_weights(self, path: str) -> None:
        """Trainable weights from a checkpoint into the unwrapped model (before DDP/FSDP wrapping)."""
        from safetensors.torch import load_file

        load_extra = getattr(self.stage, "load_extra", None)
        restored = set(load_extra(self.model, path) or ()) if load_extra is not None else set()
        if self.is_lora:
            from peft import set_peft_model_state_dict

            file = os.path.join(path, "adapter_model.safetensors")
            if not os.path.isfile(file):
                raise LmfError(f"cannot resume: {path} holds no adapter_model.safetensors (was it a LoRA run?)")
            result = set_peft_model_state_dict(self.model, load_file(file))
            if getattr(result, "unexpected_keys", None):
                raise LmfError(f"cannot resume from {path}: unexpected adapter weights {result.unexpected_keys[:3]}")
            return
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise LmfError(f"cannot resume: {path} holds no model safetensors")
        sd: dict = {}
        for f in files:
            sd.update(load_file(f))
        own = self.model.state_dict()
        sd = {k: v.to(own[k].dtype) for k, v in sd.items() if k in own}
        self.model.load_state_dict(sd, strict=False)
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in sd and n not in restored]
        if missing:
            raise LmfError(f"cannot resume from {path}: it lacks trainable weights such as {missing[0]}")

    def _load_training_state(self, path: str) -> None:
        """Optimizer, scheduler, RNG and data position from a checkpoint (after wrapping)."""
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = ckpt.read_json(os.path.join(path, ckpt.STATE_NAME))
        if saved.get("max_steps") not in (None, self.state.max_steps):
            logger.warning("resuming a run planned for %s steps with %d steps: the schedule differs",
                           saved.get("max_steps"), self.state.max_steps)
        optim_file = os.path.join(path, ckpt.OPTIMIZER_NAME)
        scheduler_file = os.path.join(path, ckpt.SCHEDULER_NAME)
        if os.path.isfile(optim_file):
            osd = torch.load(optim_file, map_location="cpu", weights_only=False)
            set_optimizer_state_dict(self.loss_module, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))
            scaler_file = os.path.join(path, "scaler.pt")
            if self.scaler is not None and os.path.isfile(scaler_file):
                self.scaler.load_state_dict(torch.load(scaler_file, weights_only=False))
        else:
            logger.warning("%s has no optimizer state (it was saved with save_only_model): the resume is "
                           "APPROXIMATE, the optimizer's moments restart from zero", path)
        if os.path.isfile(scheduler_file):
            self.scheduler.load_state_dict(torch.load(scheduler_file, weights_only=False))
        else:
            for _ in range(saved["global_step"]):
                self.scheduler.step()
        ckpt.load_rng_state(path, self.runtime.rank)
        st = self.state
        st.global_step, st.epoch = saved["global_step"], saved["epoch"]
        st.tokens_seen, st.log_history = saved.get("tokens_seen", 0), saved.get("log_history", [])
        st.log_window = saved.get("log_window", [])
        st.data_epoch = saved.get("data_epoch", 0)
        st.best_eval_loss = saved.get("best_eval_loss")
        st.evals_without_improvement = saved.get("evals_without_improvement", 0)
        st.batch_in_epoch = saved.get("batch_in_epoch", 0)
        old_world, old_micro = saved.get("world_size", 1), saved.get("micro_batch_size", st.micro_batch_size)
        if (old_world, old_micro) != (self.runtime.world_size, st.micro_batch_size):
            # Another shape of job: skip as many samples of the epoch as were consumed (a different subset of them).
            consumed = st.batch_in_epoch * old_micro * old_world
            st.batch_in_epoch = min(consumed // (st.micro_batch_size * self.runtime.world_size), self.stream.batches_per_epoch)
            logger.warning(
                "resuming a run of %d process(es) x micro-batch %d with %d x %d: the data order differs from an "
                "uninterrupted run (%d samples of epoch %d skipped)", old_world, old_micro, self.runtime.world_size,
                st.micro_batch_size, consumed, st.data_epoch,
            )
        self.stream.epoch, self.stream.batch_in_epoch = st.data_epoch, st.batch_in_epoch
        logger.info("resumed from %s at step %d (epoch %.2f)", path, st.global_step, st.epoch)
