"""Evaluation: the mean loss and the objective's metrics over one or several eval sets, across ranks, and the
:class:`Evaluator` that decides when the training loop evaluates and when it stops early."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

from lmf.train.process import autocast, to_device

if TYPE_CHECKING:
    import torch

    from lmf.dist.runtime import DistInfo
    from lmf.train.state import Run


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
    and early stopping (``early_stopping_steps``: transformers' EarlyStoppingCallback, which LLaMA-Factory uses;
    its counters live in the train state, so they survive a resume)."""

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

    def evaluate(self, run: "Run") -> dict[str, float]:
        """:func:`evaluate` on the run's eval set(s)."""
        return evaluate(run, self.eval_dataset, self.collator, self.runtime, self.args.per_device_eval_batch_size,
                        self.dtype)

    def should_stop(self, eval_loss: float) -> bool:
        """True once eval_loss has not improved on its best for ``early_stopping_steps`` evaluations in a row."""
        from lmf.extras.logging import get_logger

        st = self.state
        if not self.patience:
            return False
        if st.best_eval_loss is None or eval_loss < st.best_eval_loss:
            st.best_eval_loss, st.evals_without_improvement = eval_loss, 0
            return False
        st.evals_without_improvement += 1
        if st.evals_without_improvement < self.patience:
            return False
        st.early_stopped = True
        get_logger(__name__).info(
            "early stopping at step %d: eval_loss has not improved on %.6g for %d evaluation(s) (early_stopping_steps)",
            st.global_step, st.best_eval_loss, self.patience)
        return True
