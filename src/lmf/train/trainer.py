"""The one training loop shared by every stage (SFT, DPO, RM, ...), to be read top to bottom.

A stage (:class:`~lmf.train.state.Stage`) supplies a collator and ``compute_loss(model, batch) ->
(loss_sum, num_items, metrics)``. :meth:`Trainer.setup` wraps the model and the stage's loss in one
``nn.Module`` and hands it to DDP/FSDP2 (so their hooks fire); :meth:`Trainer.train` then, per step:

- accumulates ``gradient_accumulation_steps`` micro-batches, back-propagating ``loss_sum``;
- all-reduces the window's sums, the stop requests of every rank (:mod:`lmf.train.preemption`) and the
  stage metrics in one collective, and scales the gradients by ``world_size / items``, so the step
  optimises the mean over every label token of the window on every rank (not a mean of means);
- clips, steps the optimizer and the schedule, logs on rank 0, evaluates, checkpoints atomically.

Checkpoints: :class:`~lmf.train.checkpoint.CheckpointIO`; evaluation: :mod:`lmf.train.evaluate`; the
process set-up: :mod:`lmf.train.runtime`; where a run starts: :mod:`lmf.train.resume`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Optional

from lmf.extras.errors import ConfigError, LmfError
from lmf.extras.logging import get_logger
from lmf.train.checkpoint import CheckpointIO
from lmf.train.resume import (  # noqa: F401  (resolve_resume_checkpoint: re-exported for the stages)
    ResumePlan,
    prepare_output_dir,
    resolve_resume_checkpoint,
    resume_fingerprint,
    trajectory_config,
)
from lmf.train.runtime import (  # noqa: F401  (setup_runtime, set_seed, apply_tf32: re-exported)
    apply_tf32,
    autocast,
    compute_dtype,
    pick_cpu_threads,
    set_seed,
    setup_runtime,
    to_device,
)
from lmf.train.state import Run, Stage, TrainHooks, TrainState

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo

logger = get_logger(__name__)


def _make_loss_module(model, compute_loss, moe_aux_loss_coef: Optional[float] = None):
    from torch import nn

    class _LossModule(nn.Module):
        """Wraps the HF model; ``forward(batch)`` returns the stage's loss pieces (so DDP/FSDP hooks fire).
        With ``moe_aux_loss_coef`` it adds the router load-balancing loss of the trained forward, weighted by
        the batch's items (so the step's mean carries ``coef x aux``), and reports it as ``aux_loss``."""

        def __init__(self, model, compute_loss, coef):
            super().__init__()
            self.model = model
            self._compute_loss = compute_loss
            self._coef = coef
            if coef:
                from lmf.loss.moe import experts_of

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
    """Runs one stage to ``max_steps`` (or ``num_train_epochs``) with checkpoints and exact resume."""

    def __init__(self, cfg: "LmfConfig", model, tokenizer, stage: Stage, train_dataset, runtime: "DistInfo",
                 eval_dataset=None, resume: Optional[ResumePlan] = None, hooks: Optional[TrainHooks] = None):
        if len(train_dataset) == 0:
            raise LmfError("the training dataset is empty")
        self.cfg, self.args = cfg, cfg.training
        self.model, self.tokenizer, self.stage = model, tokenizer, stage
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.runtime, self.resume = runtime, resume or ResumePlan()
        self.hooks = hooks or TrainHooks()
        self.state = TrainState(world_size=runtime.world_size, micro_batch_size=self.args.per_device_train_batch_size,
                                resume_fingerprint=resume_fingerprint(cfg), trajectory=trajectory_config(cfg))
        self.checkpoints = CheckpointIO(cfg, runtime, model, tokenizer, stage, self.hooks)
        self.dtype = compute_dtype(cfg, runtime.device)  # autocast dtype (None: none)
        self.run: Optional[Run] = None

    @property
    def wrapped(self):
        return self.run.wrapped

    # ------------------------------------------------------------------ setup
    def setup(self) -> Run:
        """Data stream, plan, wrapped loss module, optimizer and schedule; the checkpoint's state on resume."""
        import torch

        from lmf.config.deepspeed import read_deepspeed_config
        from lmf.dist.plan import plan_parallelism
        from lmf.train.batches import build_stream
        from lmf.train.loss_scale import create_grad_scaler
        from lmf.train.optim import create_optimizer, create_scheduler
        from lmf.train.parallel import wrap

        pick_cpu_threads(self.model, self.runtime.device)
        stream = build_stream(self.train_dataset, self.stage.collator, self.args, self.cfg.finetuning, self.runtime,
                              cutoff_len=self.cfg.data.cutoff_len)
        self.state.max_steps = self._total_steps(stream.batches_per_epoch)
        plan = plan_parallelism(self.cfg, self.runtime.world_size, announce=False)  # announced by the workflow
        # init_on_rank0: rank 0 loads and sends them on; init_on_meta: every rank reads its shards once sharded
        if self.resume.checkpoint and not plan.from_checkpoint and not (plan.from_rank0 and self.runtime.rank != 0):
            self.checkpoints.load_weights(self.resume.checkpoint)
        loss_module = _make_loss_module(self.model, self.stage.compute_loss, self.cfg.model.moe_aux_loss_coef)
        sources = (self.cfg.model.model_name_or_path,) + ((self.resume.checkpoint,) if self.resume.checkpoint else ())
        wrapped = wrap(loss_module, plan, self.runtime.device, self.dtype, self.args.ddp_find_unused_parameters,
                       checkpoint_dirs=sources if plan.from_checkpoint else ())
        optimizer = create_optimizer(loss_module, self.args, self.cfg.finetuning)
        scaler = None
        if self.dtype == torch.float16 and plan.mode != "fsdp":
            ds = read_deepspeed_config(self.cfg)
            scaler = create_grad_scaler(self.runtime.device.type, ds.loss_scale if ds else None)
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

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainState:
        """Train to the last step, then save the final model and state (rank 0).

        A SIGTERM/SIGINT ends the run after the current step with a checkpoint and
        :class:`~lmf.train.preemption.TrainingInterrupted`.
        """
        import torch

        from lmf.dist.runtime import all_reduce_sum
        from lmf.train.metrics import accumulate, finalize
        from lmf.train.parallel import gradient_sync, log_offload
        from lmf.train.preemption import StopRequest, TrainingInterrupted, agreed_signal
        from lmf.train.reporting import Progress, Reporter, warn_if_no_plot

        run = self.setup()
        # every check has passed (config, data, template, model, runtime, resume state): only now is output_dir touched
        prepare_output_dir(self.cfg, self.resume, self.runtime)
        if self.cfg.finetuning.pissa_convert and self.runtime.is_main:
            from lmf.train.pissa import save_initial_adapter

            save_initial_adapter(self.model, self.args.output_dir)
        args, st, device = self.args, self.state, self.runtime.device
        reporter = Reporter(self.cfg, self.runtime.is_main)
        self._log_start()
        warn_if_no_plot(self.cfg, self.runtime.is_main)
        progress = Progress(st.max_steps, st.global_step, self.runtime.is_main and not args.disable_tqdm)
        window_start, window_tokens = time.perf_counter(), 0
        epochs_done = self._epochs_done()
        stop = StopRequest().install()
        offload_reported = False
        run.wrapped.train()
        try:
            while st.global_step < st.max_steps:
                step_start = time.perf_counter()
                acc = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, items, input tokens
                metric_sums: dict[str, float] = {}
                n_micro = min(args.gradient_accumulation_steps, run.stream.batches_left_in_epoch)
                for micro in range(n_micro):
                    batch = to_device(next(run.stream), device)
                    with gradient_sync(run.wrapped, run.plan, enabled=micro == n_micro - 1), \
                            autocast(self.dtype, device):
                        loss_sum, num_items, metrics = run.wrapped(batch)
                    if run.steps_in_backward:  # layerwise optimizers step in the backward hooks: mean loss
                        (loss_sum / max(float(num_items), 1.0)).backward()
                    else:
                        (run.scaler.scale(loss_sum) if run.scaler else loss_sum).backward()
                    acc[0] += loss_sum.detach().double()
                    acc[1] += num_items.detach().double() if hasattr(num_items, "detach") else float(num_items)
                    mask = batch.get("attention_mask")
                    acc[2] += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
                    accumulate(metric_sums, metrics)
                # one all-reduce: the window's sums, the stop requests of every rank, the stage metrics
                names = sorted(metric_sums)
                stats = torch.cat([acc, torch.tensor(stop.flags(), dtype=torch.float64, device=device),
                                   torch.tensor([metric_sums[k] for k in names], dtype=torch.float64, device=device)])
                all_reduce_sum(stats)
                loss_total, items, tokens = stats[0].item(), stats[1].item(), stats[2].item()
                stop_signal = agreed_signal(stats[3].item(), stats[4].item())
                grad_norm = self._optimizer_step(items)
                if run.plan.offload and not offload_reported:
                    offload_reported = log_offload(run.loss_module, run.optimizer, self.runtime.is_main)
                st.global_step += 1
                self.hooks.after_step(st.global_step)
                st.tokens_seen += int(tokens)
                st.data_epoch, st.batch_in_epoch = run.stream.epoch, run.stream.batch_in_epoch
                st.epoch = round(run.stream.epoch_float, 4)
                step_loss = loss_total / max(items, 1.0)
                st.log_window.append(step_loss)  # in the state: a resumed run logs the same averages
                window_tokens += int(tokens)
                lr = run.scheduler.get_last_lr()[0]
                progress.update(step_loss, lr, tokens / max(time.perf_counter() - step_start, 1e-9))
                is_last = st.global_step >= st.max_steps
                if st.global_step % args.logging_steps == 0 or is_last or (args.logging_first_step and st.global_step == 1):
                    n_div = n_micro * self.runtime.world_size
                    entry = {"step": st.global_step, "epoch": st.epoch,
                             "loss": round(sum(st.log_window) / len(st.log_window), 6), "lr": lr,
                             "grad_norm": round(grad_norm, 6),
                             "tokens_per_second": round(window_tokens / max(time.perf_counter() - window_start, 1e-9), 1),
                             **finalize(names, stats[5:].tolist(), n_div)}
                    self._record(entry, reporter, progress.suffix())
                    st.log_window, window_tokens, window_start = [], 0, time.perf_counter()
                epoch_ended = self._epochs_done() > epochs_done
                epochs_done = self._epochs_done()
                if is_last:
                    break
                if stop_signal is not None:
                    raise TrainingInterrupted(stop_signal, st.global_step, self.checkpoints.save(run, st))
                if self.eval_dataset is not None and self._eval_due(is_last, epoch_ended):
                    results = self.evaluate()
                    self._record({"step": st.global_step, **results}, reporter)
                    if self._should_stop_early(results["eval_loss"]):
                        break
                if self._save_due(epoch_ended):
                    self.checkpoints.save(run, st)
        finally:
            stop.restore()
            progress.close()
            run.stream.close()  # its DataLoader workers: gone with the loop, also in a process that trains again
            if sys.exc_info()[0] is not None:
                reporter.close()
        if self.eval_dataset is not None and not st.early_stopped and self._eval_due(True, False):
            self._record({"step": st.global_step, **self.evaluate()}, reporter)
        st.finished = True
        if args.save_strategy != "no":
            self.checkpoints.save(run, st)
        self.checkpoints.save_final(run, st)
        reporter.close()
        return st

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

    def evaluate(self) -> dict[str, float]:
        """:func:`lmf.train.evaluate.evaluate` on this run's eval set(s)."""
        from lmf.train.evaluate import evaluate

        return evaluate(self.run, self.eval_dataset, self.stage.collator, self.runtime,
                        self.args.per_device_eval_batch_size, self.dtype)

    # ------------------------------------------------------------------ cadence
    def _epochs_done(self) -> int:
        """Completed passes over the data (an epoch counts as done once its last micro-batch is consumed)."""
        stream = self.run.stream
        return stream.epoch + (1 if stream.batch_in_epoch >= stream.batches_per_epoch else 0)

    def _every(self, value) -> int:
        """A ``*_steps`` value: a count, or a fraction (< 1) of the planned steps."""
        return max(1, math.ceil(value * self.state.max_steps)) if 0 < value < 1 else max(1, int(value))

    def _eval_due(self, is_last: bool, epoch_ended: bool) -> bool:
        strategy = self.args.eval_strategy
        if strategy == "no":
            return is_last and self.args.do_eval
        if strategy == "steps":
            return self.state.global_step % self._every(self.args.eval_steps or self.args.logging_steps) == 0 or is_last
        return is_last or epoch_ended

    def _save_due(self, epoch_ended: bool) -> bool:
        if self.args.save_strategy == "steps":
            return self.state.global_step % self._every(self.args.save_steps) == 0
        return self.args.save_strategy == "epoch" and epoch_ended

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

    # ------------------------------------------------------------------ logging
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
            "%d trainable of %d params, parallel=%s, device=%s%s%s",
            len(self.train_dataset), st.max_steps, a.per_device_train_batch_size, a.gradient_accumulation_steps,
            self.runtime.world_size,
            a.per_device_train_batch_size * a.gradient_accumulation_steps * self.runtime.world_size,
            trainable, total, self.run.plan.mode, self.runtime.device,
            f", autocast {str(self.dtype).replace('torch.', '')}" if self.dtype is not None else "",
            f", resuming at step {st.global_step} from {self.resume.checkpoint}" if self.resume.checkpoint else "",
        )

