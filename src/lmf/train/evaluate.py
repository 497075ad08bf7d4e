"""Evaluation: the mean loss and the stage's metrics over one or several eval sets, across ranks."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

from lmf.train.runtime import autocast, to_device

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
