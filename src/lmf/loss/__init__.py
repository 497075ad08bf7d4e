"""Losses computed from decoder hidden states and the LM head weight.

Contract used by every trainer (SFT, DPO, RM):

- ``decoder_hidden_states(model, input_ids, attention_mask, position_ids=None)`` -> final hidden
  states ``[B, T, H]`` (after the final norm) of a causal LM, whether ``model`` is a plain
  transformers model or a PEFT-wrapped one. Call it on the *unwrapped* model (not on the
  DDP/FSDP wrapper); the trainer wraps a module whose ``forward`` calls these functions.
- ``lm_head_of(model)`` -> the output projection module (``nn.Linear``).
- ``causal_lm_loss(hidden, lm_head, labels, chunk_size=None)`` -> ``(loss_sum, num_tokens)``:
  the *sum* of next-token cross-entropy over label positions (``labels != -100`` after shifting
  by one) and their count, so that callers can normalise across accumulated micro-batches.
- ``sequence_logps(hidden, lm_head, labels, chunk_size=None)`` -> ``(logps_sum [B], num_tokens [B])``:
  per-sequence sum of log-probs of the label tokens (DPO/ORPO/SimPO).

``chunk_size=None`` or ``0`` is the plain path (full logits). The chunked path never holds
``[tokens, vocab]`` logits for the whole batch (see ``lmf.loss.chunked``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

IGNORE_INDEX = -100


def unwrap_causal_lm(model):
    """The underlying ``*ForCausalLM`` module of a PEFT-wrapped (or plain) model."""
    inner = model
    # PeftModel -> LoraModel -> *ForCausalLM
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def decoder_hidden_states(model, input_ids, attention_mask=None, position_ids=None) -> "torch.Tensor":
    """Final-norm hidden states of the decoder stack, without computing logits."""
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def lm_head_of(model) -> "nn.Module":
    """The output projection of a (possibly PEFT-wrapped) causal LM."""
    return unwrap_causal_lm(model).get_output_embeddings()


def _shift(hidden, labels):
    return hidden[:, :-1, :], labels[:, 1:]


def causal_lm_loss(hidden, lm_head, labels, chunk_size: Optional[int] = None):
    """Sum of next-token cross-entropy over label tokens, and the number of label tokens."""
    if chunk_size:
        from lmf.loss.chunked import chunked_causal_lm_loss

        return chunked_causal_lm_loss(hidden, lm_head, labels, chunk_size)
    import torch.nn.functional as F

    h, y = _shift(hidden, labels)
    logits = lm_head(h).float()
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (y != IGNORE_INDEX).sum()


def sequence_logps(hidden, lm_head, labels, chunk_size: Optional[int] = None):
    """Per-sequence sum of label-token log-probs ``[B]`` and label-token counts ``[B]``."""
    if chunk_size:
        from lmf.loss.chunked import chunked_sequence_logps

        return chunked_sequence_logps(hidden, lm_head, labels, chunk_size)
    import torch

    h, y = _shift(hidden, labels)
    logits = lm_head(h).float()
    mask = y != IGNORE_INDEX
    safe = torch.where(mask, y, torch.zeros_like(y))
    logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)
