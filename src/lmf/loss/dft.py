"""DFT, Dynamic Fine-Tuning (Wu et al., 2025; LLaMA-Factory's ``use_dft_loss``): each label token's
cross-entropy weighted by the model's own (detached) probability of that token,
``sum_t -p_t.detach() * log p_t``; same ``(loss_sum, num_tokens)`` contract as ``causal_lm_loss``, on the
chunked path (no ``[tokens, vocab]`` logits) or the plain one."""

from __future__ import annotations

from typing import Optional

from lmf.extras.constants import IGNORE_INDEX


def token_logps(hidden, lm_head, labels, chunk_size: Optional[int] = None, softcap: Optional[float] = None):
    """Log-probs ``[N]`` of the label tokens (next-token shift applied), with gradients."""
    if chunk_size:
        from lmf.loss.chunked import chunked_token_logps

        return chunked_token_logps(hidden, lm_head, labels, chunk_size, softcap)[0]
    logits = lm_head(hidden[:, :-1, :]).float()
    if softcap:
        logits = softcap * (logits / softcap).tanh()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = logits.log_softmax(-1)[mask]
    return logps.gather(1, targets[mask].unsqueeze(1)).squeeze(1)


def dft_loss(hidden, lm_head, labels, chunk_size: Optional[int] = None, *, softcap: Optional[float] = None,
             use_liger: bool = False):
    """``(sum over label tokens of -p.detach() * log p, number of label tokens)``; ``use_liger`` is ignored."""
    logps = token_logps(hidden, lm_head, labels, chunk_size, softcap)
    return -(logps.detach().exp() * logps).sum(), (labels[:, 1:] != IGNORE_INDEX).sum()
