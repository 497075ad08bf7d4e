"""Evaluation: the mean loss and the objective's metrics over one or several eval sets, across ranks, and the
:class:`Evaluator` that decides when the training loop evaluates and when it stops early."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Optional

from lmf.extras.errors import LmfError
from lmf.train.process import autocast, to_device

if TYPE_CHECKING:
    import torch

    from lmf.dist.runtime import DistInfo
    from lmf.train.state import Run, TrainState


@contextlib.contextmanager
def eval_mode(module):
    module.eval()
    try:
        yield
    finally:
        module.train()


def evaluate(run: "Run", eval_dataset, collator, runtime: "DistInfo", batch_size: int,
             dtype: Optional["torch.dtype"]) -> dict[str, float]:
    """``eval_loss`` and ``eval_<metric>`` over ``eval_dataset``; with several eval sets (a dict, from
    ``eval_on_each_dataset``) ``eval_<name>_loss`` / ``eval_<name>_<metric>`` per set and their mean loss as
    ``eval_loss``."""
    if not isinstance(eval_dataset, dict):
        return _evaluate_one(run, eval_dataset, collator, runtime, batch_size, dtype, "eval")
    out: dict[str, float] = {}
    for name, dataset in eval_dataset.items():
        out.update(_evaluate_one(run, dataset, collator, runtime, batch_size, dtype, f"eval_{name}"))
    losses = [out[f"eval_{name}_loss"] for name in eval_dataset]
    out["eval_loss"] = round(sum(losses) / len(losses), 6)
    return out


def _evaluate_one(run: "Run", dataset, collator, runtime: "DistInfo", batch_size: int, dtype, prefix: str):
    """``{prefix}_loss`` (sum of losses / sum of items across ranks) and the stage's item-weighted metrics.

    Each item is counted once across ranks; ranks with fewer batches run filler forwards (FSDP gathers
    weights in each one) whose results are dropped. The DataLoader has its own generator: evaluating
    never draws from the global RNG, so eval keys cannot change the training trajectory.
    """
    import torch

    from lmf.dist.runtime import all_reduce_sum
    from lmf.train.batches import sharded_index_batches
    from lmf.train.metrics import accumulate, finalize

    batches, num_real = sharded_index_batches(len(dataset), runtime.world_size, runtime.rank, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collator,
                                         generator=torch.Generator())
    acc = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    metric_sums: dict[str, float] = {}  # stage metrics weighted by items
    with eval_mode(run.wrapped), torch.no_grad():
        for i, batch in enumerate(loader):
            with autocast(dtype, runtime.device):
                loss_sum, items, metrics = run.wrapped(to_device(batch, runtime.device))
            if i >= num_real:
                continue
            acc[0] += loss_sum.double()
            acc[1] += items.double() if hasattr(items, "double") else float(items)
            accumulate(metric_sums, metrics, weight=float(items))
    keys = sorted(metric_sums)
    acc = torch.cat([acc, torch.tensor([metric_sums[k] for k in keys], dtype=torch.float64, device=acc.device)])
    all_reduce_sum(acc)
    n = max(acc[1].item(), 1.0)
    return {f"{prefix}_loss": round(acc[0].item() / n, 6),
            **{f"{prefix}_{k}": v for k, v in finalize(keys, acc[2:].tolist(), n).items()}}


class Evaluator:
    """Owns evaluation during training: when it is due (``eval_strategy``, ``eval_steps``, ``do_eval``), running it,
    the best metric so far (``metric_for_best_model``, ``greater_is_better``) and early stopping on it
    (``early_stopping_steps``: transformers' EarlyStoppingCallback, which LLaMA-Factory uses); the counters live in
    the train state, so they survive a resume."""

    def __init__(self, cfg, eval_dataset, collator, runtime: "DistInfo", dtype, state):
        self.args, self.patience = cfg.training, cfg.finetuning.early_stopping_steps
        self.eval_dataset, self.collator, self.runtime, self.dtype, self.state = (
            eval_dataset, collator, runtime, dtype, state)

    def should_evaluate(self, step: int, *, last: bool, epoch_ended: bool = False) -> bool:
        """After ``step``: ``last`` is the run's final step (evaluated once, after the loop)."""
        from lmf.train.step import every

        if self.eval_dataset is None or (last and self.state.early_stopped):
            return False
        strategy = self.args.eval_strategy
        if strategy == "no":
            return last and self.args.do_eval
        if last:
            return True
        if strategy == "steps":  # eval_delay: in steps, or in epochs below (transformers' reading of it)
            return step >= self.args.eval_delay and step % every(self.args.eval_steps or self.args.logging_steps,
                                                                 self.state.max_steps) == 0
        return epoch_ended and self.state.epoch >= self.args.eval_delay

    def should_evaluate_on_start(self) -> bool:
        """``eval_on_start``: once before the first step of this process (a resumed run evaluates what it resumed)."""
        return bool(self.args.eval_on_start and self.eval_dataset is not None)

    def evaluate(self, run: "Run", final: bool = False) -> dict[str, float]:
        """:func:`evaluate` on the run's eval set(s); the ``final`` one (after the last step) in bf16 / fp16 under
        ``bf16_full_eval`` / ``fp16_full_eval``."""
        import torch

        dtype = self.dtype
        if final and (self.args.bf16_full_eval or self.args.fp16_full_eval):
            dtype = torch.bfloat16 if self.args.bf16_full_eval else torch.float16
        return evaluate(run, self.eval_dataset, self.collator, self.runtime, self.args.per_device_eval_batch_size,
                        dtype)

    def should_stop(self, results: dict[str, float]) -> bool:
        """Record ``results`` against the best ``metric_for_best_model`` so far (transformers' rule: an improvement
        is strictly better); True once it has not improved for ``early_stopping_steps`` evaluations in a row."""
        from lmf.extras.logging import get_logger

        st, metric = self.state, self.args.metric_for_best_model
        if metric not in results:
            raise LmfError(f"config key 'metric_for_best_model': the evaluation reports no {metric!r} (it reports "
                           f"{', '.join(sorted(results))})")
        value = results[metric]
        better = st.best_metric is None or (value > st.best_metric if self.args.greater_is_better
                                            else value < st.best_metric)
        if better:
            st.best_metric, st.best_global_step, st.evals_without_improvement = value, st.global_step, 0
            return False
        st.evals_without_improvement += 1
        if not self.patience or st.evals_without_improvement < self.patience:
            return False
        st.early_stopped = True
        get_logger(__name__).info(
            "early stopping at step %d: %s has not improved on %.6g for %d evaluation(s) (early_stopping_steps)",
            st.global_step, metric, st.best_metric, self.patience)
        return True


def best_checkpoint_to_load(args, state: "TrainState") -> Optional[str]:
    """``load_best_model_at_end``: the checkpoint of the best evaluation, when it is not the last step's (whose
    weights the model holds); the log says which."""
    from lmf.extras.logging import get_logger
    from lmf.train.checkpoint import checkpoint_step

    log, best = get_logger(__name__), state.best_model_checkpoint
    if best is None:
        log.warning("load_best_model_at_end: no checkpoint was saved at an evaluation; the final model is the last "
                    "step's")
        return None
    path = os.path.join(args.output_dir, os.path.basename(os.path.normpath(best)))
    metric = f"{args.metric_for_best_model}={state.best_metric:.6g}"
    if checkpoint_step(path) == state.global_step:
        log.info("load_best_model_at_end: the last step's model is the best (%s, %s)", metric, path)
        return None
    log.info("load_best_model_at_end: loading the best checkpoint %s (%s at step %d) as the final model", path,
             metric, state.best_global_step)
    return path
