"""Cross-entropy and sequence log-probs from decoder hidden states and the LM head weight.

Contract used by every stage (SFT, DPO, RM, ...):

- ``causal_lm_loss(hidden, lm_head, labels, chunk_size=None)`` -> ``(loss_sum, num_tokens)``:
  the *sum* of next-token cross-entropy over label positions (``labels != -100`` after shifting
  by one) and their count, so that callers can normalise across accumulated micro-batches.
- ``sequence_logps(hidden, lm_head, labels, chunk_size=None)`` -> ``(logps_sum [B], num_tokens [B])``:
  per-sequence sum of log-probs of the label tokens (DPO/ORPO/SimPO).

``chunk_size=None`` or ``0`` is the plain path (full logits). The chunked path never holds
``[tokens, vocab]`` logits for the whole batch (see ``lmf.loss.chunked``).

Both also take keyword-only ``softcap`` (gemma2's ``final_logit_softcapping``) and ``use_liger``
(liger-kernel's fused linear cross-entropy for ``causal_lm_loss`` on CUDA when it is installed;
ignored elsewhere and by ``sequence_logps``). Stages get all three from the config:

    opts = loss_kwargs(cfg.model, model)          # {"chunk_size", "softcap", "use_liger"}
    loss_sum, n = causal_lm_loss(hidden, lm_head_of(model), labels, **opts)
"""

from __future__ import annotations

from typing import Optional

from lmf.extras.constants import IGNORE_INDEX
from lmf.extras.logging import log_once
from lmf.loss.liger import liger_causal_lm_loss, use_liger_for
from lmf.model.forward import logit_softcap_of, unwrap_causal_lm


def _shift(hidden, labels):
    return hidden[:, :-1, :], labels[:, 1:]


def _plain_logits(h, lm_head, softcap):
    logits = lm_head(h).float()
    if softcap:
        logits = softcap * (logits / softcap).tanh()
    return logits


#: ``loss_chunk_size`` unset: one chunk's logits hold about this many fp32 values (256 MiB)
AUTO_CHUNK_LOGITS = 1 << 26


def auto_chunk_size(vocab_size: Optional[int]) -> int:
    """Tokens per loss chunk for a vocabulary: 1024 up to a 64k vocabulary, fewer above it (a multiple of 128), so
    the chunk's fp32 logits stay near 256 MiB (with Qwen's 151,936 tokens 1024 rows would hold 594 MiB)."""
    if not vocab_size:
        return 1024
    return max(128, min(1024, AUTO_CHUNK_LOGITS // int(vocab_size) // 128 * 128))


def _vocab_size(model, config) -> Optional[int]:
    head = getattr(unwrap_causal_lm(model), "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 1:
        return int(weight.shape[0])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def loss_kwargs(model_args, model) -> dict:
    """Keyword arguments for :func:`causal_lm_loss` / :func:`sequence_logps` from the model config
    keys ``use_chunked_loss``, ``loss_chunk_size`` and ``enable_liger_kernel``; ``use_onednn_matmul`` applies to the
    process (:func:`lmf.loss.onednn.set_enabled`)."""
    from lmf.loss.onednn import set_enabled

    set_enabled(model_args.use_onednn_matmul)
    config = getattr(unwrap_causal_lm(model), "config", None)
    chunk_size = None
    if model_args.use_chunked_loss:
        chunk_size = model_args.loss_chunk_size
        if chunk_size is None:
            chunk_size = auto_chunk_size(_vocab_size(model, config))
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) <= 0):
        from lmf.extras.errors import ConfigError

        raise ConfigError(f"loss_chunk_size must be a positive number of tokens, got {model_args.loss_chunk_size}")
    for key in ("logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            log_once("lmf.loss", key, f"the model config's {key} is not applied by lmf's loss (logits are unscaled)",
                     warning=True)
    use_liger = bool(model_args.enable_liger_kernel) and \
        (model_args.liger_kernel_config or {}).get("fused_linear_cross_entropy", True) is not False
    return {"chunk_size": int(chunk_size) if chunk_size else None, "softcap": logit_softcap_of(model), "use_liger": use_liger}


def causal_lm_loss(hidden, lm_head, labels, chunk_size: Optional[int] = None, *,
                   softcap: Optional[float] = None, use_liger: bool = False, label_smoothing: float = 0.0):
    """Sum of next-token cross-entropy over label tokens, and the number of label tokens. ``label_smoothing`` e:
    ``(1 - e) * CE + e * mean_v(-log p_v)`` per token (transformers' LabelSmoother, torch's label_smoothing)."""
    if use_liger_for(hidden, use_liger):
        from lmf.loss.chunked import linear_params

        if linear_params(lm_head) is not None:
            return liger_causal_lm_loss(hidden, lm_head, labels, softcap, label_smoothing)
        log_once("lmf.loss", "liger-head", "enable_liger_kernel: the LM head is not a plain nn.Linear; using the chunked loss")
        chunk_size = chunk_size or 1024
    if chunk_size:
        from lmf.loss.chunked import chunked_causal_lm_loss

        return chunked_causal_lm_loss(hidden, lm_head, labels, chunk_size, softcap=softcap,
                                      label_smoothing=label_smoothing)
    import torch.nn.functional as F

    h, y = _shift(hidden, labels)
    logits = _plain_logits(h, lm_head, softcap)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
        label_smoothing=label_smoothing,
    )
    return loss_sum, (y != IGNORE_INDEX).sum()


def sequence_logps(hidden, lm_head, labels, chunk_size: Optional[int] = None, *,
                   softcap: Optional[float] = None, use_liger: bool = False):
    """Per-sequence sum of label-token log-probs ``[B]`` and label-token counts ``[B]``.

    ``use_liger`` is accepted for symmetry with :func:`causal_lm_loss` and ignored: the chunked
    path (or the plain one) computes per-token log-probs.
    """
    if chunk_size:
        from lmf.loss.chunked import chunked_sequence_logps

        return chunked_sequence_logps(hidden, lm_head, labels, chunk_size, softcap=softcap)
    import torch

    h, y = _shift(hidden, labels)
    logits = _plain_logits(h, lm_head, softcap)
    mask = y != IGNORE_INDEX
    safe = torch.where(mask, y, torch.zeros_like(y))
    logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)
