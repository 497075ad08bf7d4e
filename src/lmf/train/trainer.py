"""The one training loop shared by every stage (SFT, DPO, RM, KTO), to be read top to bottom.

A stage's recipe supplies an :class:`~lmf.train.state.Objective`: a collator and ``compute_loss(model, batch) ->
(loss_sum, num_items, metrics)``. :meth:`Trainer.setup` wraps the model and the objective's loss in one ``nn.Module``
and hands it to DDP/FSDP2 (so their hooks fire). :meth:`Trainer.train` runs :meth:`Trainer.train_step` to the last
step; the components it calls decide their own cadence: the training log (:class:`~lmf.train.reporting.TrainingLog`:
``logging_steps``), the evaluator (:class:`~lmf.train.evaluate.Evaluator`: ``eval_strategy``, early stopping) and the
checkpoints (:class:`~lmf.train.checkpoint.CheckpointIO`: ``save_strategy``, atomic saves). One step
(:class:`~lmf.train.step.StepRecord`):

- accumulates ``gradient_accumulation_steps`` micro-batches, back-propagating ``loss_sum``;
- all-reduces the step's sums, the stop requests of every rank (:mod:`lmf.train.preemption`) and the objective's
  metrics in one collective, and scales the gradients by ``world_size / items``, so the step optimises the mean over
  every item of the step on every rank (not a mean of means);
- clips, steps the optimizer and the schedule.

Where a run starts: :mod:`lmf.train.resume`; the process set-up: :mod:`lmf.train.process`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Callable, Optional

from lmf.extras.errors import ConfigError, LmfError
from lmf.extras.logging import get_logger
from lmf.train.checkpoint import CheckpointIO
from lmf.train.resume import ResumePlan, prepare_output_dir, resume_fingerprint, trajectory_config
from lmf.train.process import autocast, compute_dtype, pick_cpu_threads, release_cached_memory, to_device
from lmf.train.state import Objective, Run, TrainHooks, TrainState
from lmf.train.step import StepRecord, StepSums

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.plan import ParallelPlan
    from lmf.dist.runtime import DistInfo

logger = get_logger(__name__)


def _make_loss_module(model, compute_loss, moe_aux_loss_coef: Optional[float] = None):
    from torch import nn

    class _LossModule(nn.Module):
        """Wraps the HF model; ``forward(batch)`` returns the objective's loss pieces (so DDP/FSDP hooks fire).
        With ``moe_aux_loss_coef`` it adds the router load-balancing loss of the trained forward, weighted by
        the batch's items (so the step's mean carries ``coef x aux``), and reports it as ``aux_loss``."""

        def __init__(self, model, compute_loss, coef):
            super().__init__()
            self.model = model
            self._compute_loss = compute_loss
            self._coef = coef
            if coef:
                from lmf.model.moe import experts_of

                self._experts = experts_of(model.config)

        def forward(self, batch):
            loss_sum, items, metrics = self._compute_loss(self.model, batch)
            if self._coef:
                from lmf.loss.moe import load_balancing_loss
                from lmf.model.forward import pop_router_logits

                import torch

                logits = pop_router_logits(self.model)
                if logits is None and torch.is_grad_enabled():
                    raise RuntimeError("moe_aux_loss_coef is set but the trained forward returned no router logits")
                if logits is not None:
                    aux = load_balancing_loss(logits, *self._experts)
                    loss_sum = loss_sum + self._coef * aux * items
                    metrics = dict(metrics, aux_loss=float(aux.detach()))
            return loss_sum, items, metrics

    return _LossModule(model, compute_loss, moe_aux_loss_coef)


class Trainer:
    """Runs one objective to ``max_steps`` (or ``num_train_epochs``) with evaluation, checkpoints and exact resume."""

    def __init__(self, cfg: "LmfConfig", model, tokenizer, objective: Objective, train_dataset, runtime: "DistInfo",
                 eval_dataset=None, resume: Optional[ResumePlan] = None, hooks: Optional[TrainHooks] = None,
                 plan: Optional["ParallelPlan"] = None):
        from lmf.dist.plan import plan_parallelism
        from lmf.train.evaluate import Evaluator

        if not getattr(train_dataset, "streamed", False) and len(train_dataset) == 0:
            raise LmfError("the training dataset is empty")
        self.cfg, self.args = cfg, cfg.training
        self.model, self.tokenizer, self.objective = model, tokenizer, objective
        self.train_dataset = train_dataset
        self.runtime, self.resume = runtime, resume or ResumePlan()
        self.plan = plan or plan_parallelism(cfg, runtime.world_size, announce=False)
        if self.args.load_best_model_at_end and self.plan.mode == "fsdp":
            raise ConfigError("config key 'load_best_model_at_end' under FSDP sharding (fsdp, or a DeepSpeed ZeRO-2/3 "
                              "config) is not implemented in lmf: the best checkpoint is loaded into an unsharded "
                              "model (one process or DDP); remove one of them")
        self.hooks = hooks or TrainHooks()
        self.state = TrainState(world_size=runtime.world_size, micro_batch_size=self.args.per_device_train_batch_size,
                                resume_fingerprint=resume_fingerprint(cfg), trajectory=trajectory_config(cfg),
                                objective_state=getattr(objective, "persistent_state", {}))  # live: saved as it is
        self.dtype = compute_dtype(cfg, runtime.device)  # autocast dtype (None: none)
        self.checkpoints = CheckpointIO(cfg, runtime, model, tokenizer, objective, self.hooks)
        self.evaluator = Evaluator(cfg, eval_dataset, objective.collator, runtime, self.dtype, self.state)
        self.run: Optional[Run] = None
        self._offload_reported = False

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainState:
        """Train to the last step, then save the last checkpoint and the final model and state (rank 0).

        A SIGTERM/SIGINT ends the run after the current step with a checkpoint and
        :class:`~lmf.train.preemption.TrainingInterrupted`.
        """
        from lmf.train.preemption import StopRequest, TrainingInterrupted
        from lmf.train.profiler import ModuleTimer, StepProfiler
        from lmf.train.reporting import Progress, TrainingLog, warn_if_no_plot

        run, st = self.setup(), self.state
        # every check has passed (config, data, template, model, runtime, resume state): only now is output_dir touched
        prepare_output_dir(self.cfg, self.resume, self.runtime)
        self._save_pissa_initial_adapter()
        self._log_start()
        warn_if_no_plot(self.cfg, self.runtime.is_main)
        log = TrainingLog(self.cfg, st, self.runtime.is_main)
        progress = Progress(st.max_steps, st.global_step, self.runtime.is_main and not self.args.disable_tqdm)
        stop = StopRequest().install()
        profiler = StepProfiler(self.cfg, self.runtime.rank)  # enable_torch_profiler; a no-op otherwise
        profiler.start()
        timer = ModuleTimer(self.model, self.args.profile_modules, self.runtime.is_main) \
            if self.args.profile_modules else None
        if self.evaluator.should_evaluate_on_start():
            log.write({"step": st.global_step, **self.evaluator.evaluate(run)})
        run.wrapped.train()
        try:
            while st.global_step < st.max_steps:
                record = self.train_step(stop.flags)
                profiler.step()
                last = record.step >= st.max_steps
                if timer is not None:
                    timer.after_step(record.step, log.reports(record.step, last, record.epoch_ended))
                progress.update(record.loss, record.lr, record.tokens / max(record.seconds, 1e-9))
                log.after_step(record, last, progress.suffix())
                if last:
                    break
                if record.stop_signal is not None:
                    raise TrainingInterrupted(record.stop_signal, st.global_step, self.checkpoints.save(run, st))
                if self.evaluator.should_evaluate(record.step, last=False, epoch_ended=record.epoch_ended):
                    results = self.evaluator.evaluate(run)
                    log.write({"step": record.step, **results})
                    if self.evaluator.should_stop(results):
                        break
                self.checkpoints.save_if_due(run, st, record.epoch_ended)
        finally:
            profiler.stop()
            if timer is not None:
                timer.remove()
            stop.restore()
            progress.close()
            run.stream.close()  # its DataLoader workers: gone with the loop, also in a process that trains again
            if sys.exc_info()[0] is not None:
                log.close()
        if self.evaluator.should_evaluate(st.global_step, last=True):
            results = self.evaluator.evaluate(run, final=True)
            log.write({"step": st.global_step, **results})
            self.evaluator.should_stop(results)  # the last evaluation may be the best
        st.finished = True
        self.checkpoints.save_at_end(run, st)
        log.close()
        return st

    def train_step(self, stop_flags: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)) -> StepRecord:
        """One optimizer step: accumulate the micro-batches, one all-reduce (with this rank's stop request as it
        stands then: ``stop_flags()``), normalise, clip, step; the train state advanced."""
        from lmf.train.parallel import log_offload

        run, st, device = self.run, self.state, self.runtime.device
        start, epochs_before = time.perf_counter(), self._epochs_done()
        while True:
            first = (run.stream.epoch, run.stream.batch_in_epoch)
            try:
                sums = self._accumulate()
                break
            except Exception as exc:  # auto_find_batch_size: an out-of-memory step again in smaller micro-batches
                from lmf.train.batch_finder import can_retry_smaller

                if not (self.args.auto_find_batch_size and can_retry_smaller(exc, self.args)):
                    raise
                reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            self._retry_smaller(reason, first)  # here the failed step's tensors are free (no traceback holds them)
        totals = sums.all_reduce(stop_flags(), self.runtime.world_size)
        grad_norm = self._optimizer_step(totals.items)
        if run.plan.offload and not self._offload_reported:
            self._offload_reported = log_offload(run.loss_module, run.optimizer, self.runtime.is_main)
        st.global_step += 1
        if self.args.torch_empty_cache_steps and st.global_step % self.args.torch_empty_cache_steps == 0:
            release_cached_memory(device)
        self.hooks.after_step(st.global_step)
        st.tokens_seen += totals.tokens
        st.data_epoch, st.batch_in_epoch = run.stream.epoch, run.stream.batch_in_epoch
        st.epoch = round(run.stream.epoch_float, 4)
        return StepRecord(step=st.global_step, loss=totals.loss, items=totals.items, tokens=totals.tokens,
                          grad_norm=grad_norm, lr=run.scheduler.get_last_lr()[0], seconds=time.perf_counter() - start,
                          epoch_ended=self._epochs_done() > epochs_before, metrics=totals.metrics,
                          stop_signal=totals.stop_signal)

    def _accumulate(self) -> StepSums:
        """Forward and backward of the step's micro-batches (the gradients accumulate); their sums."""
        from lmf.train.parallel import gradient_sync

        run, device = self.run, self.runtime.device
        sums = StepSums(device)
        n_micro = min(self.args.gradient_accumulation_steps, run.stream.batches_left_in_epoch)
        for micro in range(n_micro):
            batch = to_device(next(run.stream), device)
            with gradient_sync(run.wrapped, run.plan, enabled=micro == n_micro - 1), autocast(self.dtype, device):
                loss_sum, num_items, metrics = run.wrapped(batch)
            if run.steps_in_backward:  # layerwise optimizers step in the backward hooks: mean loss
                (loss_sum / max(float(num_items), 1.0)).backward()
            else:
                (run.scaler.scale(loss_sum) if run.scaler else loss_sum).backward()
            sums.add(loss_sum, num_items, batch, metrics)
        return sums

    def _retry_smaller(self, reason: str, first: tuple[int, int]) -> None:
        """``auto_find_batch_size``: after an out-of-memory error, the step's gradients dropped and the stream rebuilt
        at the step's first sample (``first``: epoch, micro-batch) in smaller micro-batches
        (:mod:`lmf.train.batch_finder`)."""
        from lmf.train.batch_finder import shrink_after_oom

        run = self.run
        restart = shrink_after_oom(self.args, first[1], reason)
        run.optimizer.zero_grad(set_to_none=True)
        release_cached_memory(self.runtime.device)
        run.stream.close()
        run.stream = self._build_stream()
        run.stream.epoch, run.stream.batch_in_epoch = first[0], restart
        self.state.micro_batch_size = self.args.per_device_train_batch_size

    def _build_stream(self):
        """The training batches (:func:`lmf.train.batches.build_stream`) with the run's current batch settings."""
        from lmf.train.batches import build_stream

        return build_stream(self.train_dataset, self.objective.collator, self.args, self.cfg.finetuning, self.runtime,
                            cutoff_len=self.cfg.data.cutoff_len)

    # ------------------------------------------------------------------ setup
    def setup(self) -> Run:
        """Data stream, plan, wrapped loss module, optimizer and schedule; the checkpoint's state on resume."""
        import torch

        from lmf.train.compile import compile_decoder_blocks
        from lmf.train.loss_scale import create_grad_scaler
        from lmf.train.optimizer import create_optimizer, create_scheduler
        from lmf.train.parallel import ddp_options, wrap

        pick_cpu_threads(self.model, self.runtime.device)
        if self.cfg.model.enable_liger_kernel:
            from lmf.loss.liger import apply_module_kernels

            apply_module_kernels(self.model, self.cfg.model.liger_kernel_config, self.runtime.device)
        if "underflow_overflow" in self.args.debug:
            from lmf.train.overflow import watch_overflow

            watch_overflow(self.model)  # its hooks hold it for as long as the model lives
        stream = self._build_stream()
        self.state.max_steps = self._total_steps(stream.batches_per_epoch)
        plan = self.plan
        # init_on_rank0: rank 0 loads and sends them on; init_on_meta: every rank reads its shards once sharded
        if self.resume.checkpoint and not plan.from_checkpoint and not (plan.from_rank0 and self.runtime.rank != 0):
            self.checkpoints.load_weights(self.resume.checkpoint)
        if self.args.fp8:  # before wrapping: FSDP2 shards the float8 linears (lmf.model.fp8)
            from lmf.model.fp8 import convert_to_fp8

            convert_to_fp8(self.model, self.runtime.device, self.args.fp8_enable_fsdp_float8_all_gather)
        compile_decoder_blocks(self.model, self.args)  # torch_compile: before wrapping, as torchtitan
        loss_module = _make_loss_module(self.model, self.objective.compute_loss, self.cfg.model.moe_aux_loss_coef)
        sources = (self.cfg.model.model_name_or_path,) + ((self.resume.checkpoint,) if self.resume.checkpoint else ())
        wrapped = wrap(loss_module, plan, self.runtime.device, self.dtype, ddp_options(self.args, plan),
                       checkpoint_dirs=sources if plan.from_checkpoint else ())
        optimizer = create_optimizer(loss_module, self.args, self.cfg.finetuning)
        scaler = None
        if self.dtype == torch.float16 and plan.mode != "fsdp":
            scaler = create_grad_scaler(self.runtime.device.type, plan.deepspeed.loss_scale if plan.deepspeed else None)
        self.run = Run(loss_module=loss_module, wrapped=wrapped, optimizer=optimizer,
                       scheduler=create_scheduler(optimizer, self.args, self.state.max_steps), scaler=scaler,
                       stream=stream, plan=plan,
                       # BAdam switches requires_grad between blocks: every parameter may carry a gradient
                       trainable=[p for p in loss_module.parameters()
                                  if p.requires_grad or getattr(optimizer, "switches_blocks", False)])
        if self.resume.checkpoint:
            self.checkpoints.load_training_state(self.resume.checkpoint, self.run, self.state)
        return self.run

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

    def _optimizer_step(self, items: float) -> float:
        """Normalise grads to the mean over the window's items, clip, step; return the grad norm."""
        import torch

        run = self.run
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        factor = self.runtime.world_size / max(items, 1.0)  # DDP/FSDP average over ranks; undo, divide by all items
        grads = [p.grad for p in run.trainable if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)
        grad_norm = 0.0
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(run.trainable, self.args.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ------------------------------------------------------------------ helpers
    def _epochs_done(self) -> int:
        """Completed passes over the data (an epoch counts as done once its last micro-batch is consumed)."""
        stream = self.run.stream
        return stream.epoch + (1 if stream.batch_in_epoch >= stream.batches_per_epoch else 0)

    def _save_pissa_initial_adapter(self) -> None:
        """``pissa_convert``: the initial PiSSA adapter, which the final conversion subtracts (rank 0)."""
        if self.cfg.finetuning.pissa_convert and self.runtime.is_writer:
            from lmf.train.pissa import save_initial_adapter

            save_initial_adapter(self.model, self.args.output_dir)

    def _log_start(self) -> None:
        from lmf.model.adapter import count_parameters

        a, st = self.args, self.state
        trainable, total = count_parameters(self.model)
        logger.info(
            "training: %s examples, %d steps, micro-batch %d x accumulation %d x %d process(es) = %d per step, "
            "%d trainable of %d params, parallel=%s, device=%s%s%s",
            "streamed" if getattr(self.train_dataset, "streamed", False) else len(self.train_dataset), st.max_steps, a.per_device_train_batch_size, a.gradient_accumulation_steps,
            self.runtime.world_size,
            a.per_device_train_batch_size * a.gradient_accumulation_steps * self.runtime.world_size,
            trainable, total, self.run.plan.mode, self.runtime.device,
            f", autocast {str(self.dtype).replace('torch.', '')}" if self.dtype is not None else "",
            f", resuming at step {st.global_step} from {self.resume.checkpoint}" if self.resume.checkpoint else "",
        )

