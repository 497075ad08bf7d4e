"""One optimizer step: what its micro-batches add up on a rank (:class:`StepSums`), the one all-reduce that makes
every rank agree on it (sums, stop requests, the objective's metrics), and the named record the loop reads
(:class:`StepRecord`, what :meth:`lmf.train.trainer.Trainer.train_step` returns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lmf.train.metrics import accumulate, finalize
from lmf.train.preemption import agreed_signal


@dataclass
class StepRecord:
    """What one optimizer step did, the same on every rank."""

    step: int
    loss: float  #: mean over every item (label token, pair, example) of the step on every rank
    items: float
    tokens: int  #: input tokens of the step on every rank
    grad_norm: float
    lr: float
    seconds: float
    epoch_ended: bool  #: the step consumed the last micro-batch of an epoch
    metrics: dict[str, float] = field(default_factory=dict)  #: the objective's metrics, finalized
    stop_signal: Optional[int] = None  #: SIGTERM/SIGINT that some rank received: stop after this step


class StepSums:
    """The sums one rank accumulates over a step's micro-batches, kept on the device (no sync per micro-batch)."""

    def __init__(self, device):
        import torch

        self.device = device
        self.loss_items_tokens = torch.zeros(3, dtype=torch.float64, device=device)
        self.metrics: dict[str, float] = {}
        self.micro_batches = 0

    def add(self, loss_sum, num_items, batch: dict, metrics: dict) -> None:
        """One micro-batch: its loss sum and item count, its input tokens (attention mask), its metrics."""
        acc = self.loss_items_tokens
        acc[0] += loss_sum.detach().double()
        acc[1] += num_items.detach().double() if hasattr(num_items, "detach") else float(num_items)
        mask = batch.get("attention_mask")
        acc[2] += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
        accumulate(self.metrics, metrics)
        self.micro_batches += 1

    def all_reduce(self, stop_flags: tuple[float, float], world_size: int) -> "StepTotals":
        """One collective for everything a step needs from every rank: the sums, the stop requests (SIGTERM,
        SIGINT counts), the objective's metric sums."""
        import torch

        from lmf.dist.runtime import all_reduce_sum

        names = sorted(self.metrics)
        stats = torch.cat([self.loss_items_tokens, torch.tensor(stop_flags, dtype=torch.float64, device=self.device),
                           torch.tensor([self.metrics[k] for k in names], dtype=torch.float64, device=self.device)])
        all_reduce_sum(stats)
        loss_sum, items, tokens, sigterms, sigints, *metric_totals = stats.tolist()
        return StepTotals(loss_sum=loss_sum, items=items, tokens=int(tokens),
                          stop_signal=agreed_signal(sigterms, sigints),
                          metrics=finalize(names, metric_totals, self.micro_batches * world_size))


@dataclass
class StepTotals:
    """A step's sums over every rank (the all-reduce's result, read by name)."""

    loss_sum: float
    items: float
    tokens: int
    stop_signal: Optional[int]
    metrics: dict[str, float]

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.items, 1.0)


def every(value: float, max_steps: int) -> int:
    """A ``*_steps`` value as a step count: a count, or a fraction (< 1) of the planned steps."""
    import math

    return max(1, math.ceil(value * max_steps)) if 0 < value < 1 else max(1, int(value))
