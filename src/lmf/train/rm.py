"""Reward modelling: a scalar value head trained with the pairwise Bradley-Terry loss.

The reward of a sequence is the value head's output at its last non-pad token; for a pair the loss
is ``-logsigmoid(r_chosen - r_rejected)``. Batches come from ``PairwiseCollator`` (rows ``[0:B]``
chosen, ``[B:2B]`` rejected), so both answers go through one forward.
"""

from __future__ import annotations

import torch

from lmf.model.value_head import last_token_index, token_values


def pairwise_scores(model, batch: dict):
    """``(chosen_scores [B], rejected_scores [B])`` from one concatenated forward."""
    mask = batch["attention_mask"]
    values = token_values(model, batch["input_ids"], mask, batch.get("position_ids"))
    scores = values.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1)
    half = scores.size(0) // 2
    return scores[:half], scores[half:]


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-log sigmoid(chosen - rejected)`` ``[B]``."""
    return -torch.nn.functional.logsigmoid(chosen_scores.float() - rejected_scores.float())


class PairwiseRMObjective:
    """``compute_loss(model, batch) -> (loss_sum, num_pairs, metrics)`` for the shared training loop."""

    def __call__(self, model, batch: dict):
        return self.compute_loss(model, batch)

    def compute_loss(self, model, batch: dict):
        chosen, rejected = pairwise_scores(model, batch)
        losses = bradley_terry_loss(chosen, rejected)
        c, r = chosen.detach().float(), rejected.detach().float()
        metrics = {
            "accuracy": (c > r).float().mean().item(),
            "scores/chosen": c.mean().item(),
            "scores/rejected": r.mean().item(),
            "scores/margins": (c - r).mean().item(),
        }
        return losses.sum(), torch.tensor(losses.size(0), device=losses.device), metrics
