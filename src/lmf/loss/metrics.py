"""Evaluation metrics computed from hidden states without full logits (``compute_accuracy``)."""

from __future__ import annotations

import torch

from lmf.loss.chunked import select_label_rows


@torch.no_grad()
def token_accuracy_counts(hidden: torch.Tensor, lm_head, labels: torch.Tensor,
                          chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total): label tokens whose greedy prediction (argmax of the next-token logits) is the label,
    and all label tokens, as LLaMA-Factory's ``compute_accuracy`` counts them. Logits exist ``chunk_size``
    rows at a time (a final-logit softcap never changes the argmax)."""
    rows, targets, _, counts = select_label_rows(hidden, labels)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, rows.size(0), chunk_size):
        predicted = lm_head(rows[start:start + chunk_size]).argmax(-1)
        correct += (predicted == targets[start:start + chunk_size]).sum()
    return correct, counts.sum()
