"""Token-weighted cross-entropies of LLaMA-Factory, each label token's cross-entropy times a detached weight; same
``(loss_sum, num_tokens)`` contract as ``causal_lm_loss``, on the chunked path (no ``[tokens, vocab]`` logits) or
the plain one:

- DFT, Dynamic Fine-Tuning (Wu et al., 2025; ``use_dft_loss``): the token's own probability,
  ``sum_t -p_t.detach() * log p_t``;
- EAFT (LLaMA-Factory main's ``use_eaft_loss``): ``(H_t / 3) ** eaft_alpha``, ``H_t`` the entropy of the model's
  top-20 next-token distribution (renormalised) at that position;
- ASFT (LLaMA-Factory main's ``use_asft_loss``): DFT plus ``asft_alpha`` times the KL divergence from a frozen
  reference's next-token distribution to the policy's at each label token (:func:`asft_loss`)."""

from __future__ import annotations

from typing import Optional

from lmf.extras.constants import IGNORE_INDEX

EAFT_TOP_K = 20  # LLaMA-Factory's entropy approximation: the top 20 logits
EAFT_SCALE = 3.0


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


def _label_rows_logits(hidden, lm_head, labels, chunk_size: Optional[int], softcap: Optional[float]):
    """fp32 logits of the label positions, ``chunk_size`` rows at a time (an iterator; no gradients)."""
    from lmf.loss.chunked import _module_logits, select_label_rows

    rows = select_label_rows(hidden, labels)[0]
    step = chunk_size or max(rows.shape[0], 1)
    for start in range(0, rows.shape[0], step):
        yield _module_logits(lm_head, rows[start:start + step], softcap)


def eaft_weights(hidden, lm_head, labels, alpha: float, chunk_size: Optional[int] = None,
                 softcap: Optional[float] = None):
    """``(H / 3) ** alpha`` per label token ``[N]``, H the entropy of the top-20 next-token distribution."""
    import torch

    with torch.no_grad():
        parts = []
        for logits in _label_rows_logits(hidden.detach(), lm_head, labels, chunk_size, softcap):
            top = logits.topk(min(EAFT_TOP_K, logits.shape[-1]), dim=-1).values
            logp = top - top.logsumexp(-1, keepdim=True)
            parts.append((-(logp.exp() * logp).sum(-1) / EAFT_SCALE).pow(alpha))
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def eaft_loss(hidden, lm_head, labels, chunk_size: Optional[int] = None, *, softcap: Optional[float] = None,
              use_liger: bool = False, alpha: float = 1.0):
    """``(sum over label tokens of -w.detach() * log p, number of label tokens)``, ``w`` from :func:`eaft_weights`;
    ``use_liger`` is ignored."""
    logps = token_logps(hidden, lm_head, labels, chunk_size, softcap)
    weights = eaft_weights(hidden, lm_head, labels, alpha, chunk_size, softcap)
    return -(weights * logps).sum(), (labels[:, 1:] != IGNORE_INDEX).sum()


def asft_loss(hidden, lm_head, labels, ref_hidden, ref_head, alpha: float, chunk_size: Optional[int] = None, *,
              softcap: Optional[float] = None, use_liger: bool = False):
    """ASFT (LLaMA-Factory main's ``use_asft_loss``): ``(sum over label tokens of the DFT term + alpha x KL(q || p),
    number of label tokens)``, ``q`` the frozen reference's next-token distribution (from ``ref_hidden`` through
    ``ref_head``), ``p`` the policy's. The KL is taken ``chunk_size`` rows at a time, each chunk recomputed in
    backward (no ``[tokens, vocab]`` logits kept); ``use_liger`` is ignored."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from lmf.loss.chunked import _module_logits, select_label_rows

    dft_sum, num_tokens = dft_loss(hidden, lm_head, labels, chunk_size, softcap=softcap)
    rows = select_label_rows(hidden, labels)[0]
    with torch.no_grad():
        ref_rows = select_label_rows(ref_hidden.detach(), labels)[0]

    def chunk_kl(policy_rows, reference_rows):
        logp = _module_logits(lm_head, policy_rows, softcap).log_softmax(-1)
        with torch.no_grad():
            logq = _module_logits(ref_head, reference_rows, softcap).log_softmax(-1)
        return F.kl_div(logp, logq, reduction="sum", log_target=True)

    step = chunk_size or max(rows.shape[0], 1)
    kl = dft_sum.new_zeros(())
    for start in range(0, rows.shape[0], step):
        args = (rows[start:start + step], ref_rows[start:start + step])
        kl = kl + (checkpoint(chunk_kl, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_kl(*args))
    return dft_sum + alpha * kl, num_tokens
