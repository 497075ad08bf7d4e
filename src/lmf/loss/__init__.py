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

Both loss functions also take keyword-only ``softcap`` (gemma2's ``final_logit_softcapping``) and
``use_liger`` (liger-kernel's fused linear cross-entropy for ``causal_lm_loss`` on CUDA when it is
installed; ignored elsewhere and by ``sequence_logps``). Trainers get all three from the config:

    opts = loss_kwargs(cfg.model, model)          # {"chunk_size", "softcap", "use_liger"}
    loss_sum, n = causal_lm_loss(hidden, lm_head_of(model), labels, **opts)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lmf.extras.constants import IGNORE_INDEX  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch
    from torch import nn


_LOGGED: set = set()


def _log_once(key: str, message: str, warning: bool = False) -> None:
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    from lmf.extras.logging import get_logger

    logger = get_logger("lmf.loss")
    (logger.warning if warning else logger.info)(message)


def unwrap_causal_lm(model):
    """The underlying ``*ForCausalLM`` module of a PEFT-wrapped (or plain) model."""
    inner = model
    # PeftModel -> LoraModel -> *ForCausalLM
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


PADDING_FREE_ATTR = "_lmf_padding_free"


def set_padding_free(model, enabled: bool) -> None:
    """Turn :func:`decoder_hidden_states`'s padding-free path on or off for ``model`` (on by default).

    A plain attribute of the underlying causal LM (never saved with the weights): the config key
    ``padding_free`` sets it once, for every stage (SFT, DPO, RM) and its reference scoring.
    """
    setattr(unwrap_causal_lm(model), PADDING_FREE_ATTR, bool(enabled))


def decoder_hidden_states(model, input_ids, attention_mask=None, position_ids=None) -> "torch.Tensor":
    """Final-norm hidden states of the decoder stack ``[B, T, H]``, without computing logits.

    With ``position_ids`` (packed rows: ids restart at 0 at every sample boundary, right padding
    gets 0s) the 2-D padding mask is dropped so that transformers derives a block-diagonal causal
    mask from the position ids (eager/flex) or per-sample sequence lengths (flash-attention):
    packed samples never attend to each other. With sdpa the rows take the per-segment path of
    ``lmf.model.packed_attention`` instead (same result, no dense mask, ``sum(L_i^2)`` work).

    Padding-free (default, where the per-segment path applies; see :func:`set_padding_free`): a
    padded batch runs without its padding. The real tokens of every row are laid end to end in one
    row whose position ids restart at each sample (each row, or each packed sample, is a segment of
    its own), the decoder runs on those alone, and the hidden states are put back in the ``[B, T, H]``
    layout with zeros at the padding. Real positions get exactly the hidden states of the padded
    batch (causal attention within a sample, the same position ids); no work is spent on padding.
    """
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
    config = getattr(causal_lm, "config", None)
    flat = _padding_free_layout(causal_lm, config, input_ids, attention_mask, position_ids)
    batch_ids = input_ids
    if flat is not None:  # one row of the real tokens; position ids restart at each sample
        keep, position_ids = flat
        input_ids = input_ids.reshape(-1).index_select(0, keep).unsqueeze(0)
    if position_ids is not None:
        attention_mask = None
    elif attention_mask is not None and _right_padded_cpu(attention_mask):
        attention_mask = None  # causal attention never looks at the padding after a row's last token
    if position_ids is None:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    else:
        from lmf.model.packed_attention import packed_sdpa

        with packed_sdpa(config, position_ids) as attn_kwargs:
            out = decoder(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False,
                          **attn_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    if flat is None:
        return hidden
    batch, seq_len = batch_ids.shape  # back to [B, T, H], zeros at the padding
    full = hidden.new_zeros(batch * seq_len, hidden.size(-1)).index_copy(0, flat[0], hidden[0])
    return full.view(batch, seq_len, hidden.size(-1))


def _padding_free_layout(causal_lm, config, input_ids, attention_mask, position_ids):
    """``(keep, flat_position_ids [1, N])`` for a padded batch that can run padding-free, else ``None``.

    ``keep`` holds the flat (``B * T``) indices of the real tokens. Applies when padding-free is on
    for the model, the batch has padding, the model takes the per-segment sdpa path, and the padding
    is on the right (without position ids, a left-padded row's real tokens would get other
    positions). Packed rows (``position_ids``) just lose their padding.
    """
    if attention_mask is None or attention_mask.dim() != 2 or input_ids.dim() != 2:
        return None
    if not getattr(causal_lm, PADDING_FREE_ATTR, True):
        return None
    import torch

    from lmf.model.packed_attention import supports

    batch, seq_len = input_ids.shape
    if position_ids is not None and position_ids.shape != input_ids.shape:
        return None
    if not supports(config, input_ids.device):
        return None
    real = attention_mask.reshape(-1) != 0
    if position_ids is None:
        if not _right_padded(attention_mask):
            return None
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len).reshape(-1)
    else:
        positions = position_ids.reshape(-1)
    keep = real.nonzero().squeeze(1)  # one device sync on CUDA (the per-segment path needs one anyway)
    if keep.numel() in (0, batch * seq_len):
        return None  # no padding: the plain path is as fast
    return keep, positions.index_select(0, keep).unsqueeze(0)


def _right_padded(attention_mask) -> bool:
    """Whether every row of a ``[B, T]`` mask is ones then zeros (a device sync on CUDA)."""
    if attention_mask.size(1) < 2:
        return True
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _right_padded_cpu(attention_mask) -> bool:
    """Whether a CPU ``[B, T]`` mask is ones then zeros in every row (checked without any device sync).

    Then the mask can be dropped: under causal attention a real token only attends to earlier
    positions, which are all real, so every non-pad position gets the same hidden state (the
    kernel then skips the masked upper triangle instead of reading a ``[B, 1, T, T]`` mask). Pad
    positions differ, but they are never labels. CUDA batches keep their mask.
    """
    if attention_mask.device.type != "cpu" or attention_mask.dim() != 2 or attention_mask.size(1) < 2:
        return False
    return _right_padded(attention_mask)


def lm_head_of(model) -> "nn.Module":
    """The output projection of a (possibly PEFT-wrapped) causal LM."""
    return unwrap_causal_lm(model).get_output_embeddings()


def _shift(hidden, labels):
    return hidden[:, :-1, :], labels[:, 1:]


def _plain_logits(h, lm_head, softcap):
    logits = lm_head(h).float()
    if softcap:
        logits = softcap * (logits / softcap).tanh()
    return logits


def logit_softcap_of(model) -> Optional[float]:
    """The final-logit softcapping of a model's config (gemma2), else ``None``."""
    config = getattr(unwrap_causal_lm(model), "config", None)
    getter = getattr(config, "get_text_config", None)
    text_config = getter() if callable(getter) else config
    return getattr(text_config, "final_logit_softcapping", None) or None


def loss_kwargs(model_args, model) -> dict:
    """Keyword arguments for :func:`causal_lm_loss` / :func:`sequence_logps` from the model config
    keys ``use_chunked_loss``, ``loss_chunk_size`` and ``enable_liger_kernel``."""
    chunk_size = int(model_args.loss_chunk_size) if model_args.use_chunked_loss else None
    if chunk_size is not None and chunk_size <= 0:
        from lmf.extras.errors import ConfigError

        raise ConfigError(f"loss_chunk_size must be a positive number of tokens, got {model_args.loss_chunk_size}")
    config = getattr(unwrap_causal_lm(model), "config", None)
    for key in ("logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            _log_once(key, f"the model config's {key} is not applied by lmf's loss (logits are unscaled)", warning=True)
    use_liger = bool(model_args.enable_liger_kernel)
    return {"chunk_size": chunk_size, "softcap": logit_softcap_of(model), "use_liger": use_liger}


def liger_available() -> bool:
    """Whether liger-kernel can be imported."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def use_liger_for(hidden, use_liger: bool) -> bool:
    """Liger's fused kernel runs only when asked for, on CUDA tensors, with liger-kernel installed."""
    if not use_liger:
        return False
    if hidden.device.type != "cuda":
        _log_once("liger-cpu", "enable_liger_kernel: liger-kernel runs on CUDA only; using the chunked loss")
        return False
    if not liger_available():
        _log_once(
            "liger-missing",
            "enable_liger_kernel: liger-kernel is not installed (pip install 'lmf[liger]'); using the chunked loss",
            warning=True,
        )
        return False
    return True


def _liger_causal_lm_loss(hidden, lm_head, labels, softcap):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from lmf.loss.chunked import linear_params, select_label_rows

    rows, targets, _, counts = select_label_rows(hidden, labels)
    if targets.numel() == 0:  # nothing to predict: the chunked path returns a connected zero
        from lmf.loss.chunked import chunked_causal_lm_loss

        return chunked_causal_lm_loss(hidden, lm_head, labels, 1024, softcap=softcap)
    weight, bias = linear_params(lm_head)
    kwargs = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if softcap:
        kwargs["softcap"] = softcap
    out = LigerFusedLinearCrossEntropyLoss(**kwargs)(weight, rows, targets, bias)
    loss_sum = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return loss_sum.float(), counts.sum()


def causal_lm_loss(hidden, lm_head, labels, chunk_size: Optional[int] = None, *,
                   softcap: Optional[float] = None, use_liger: bool = False):
    """Sum of next-token cross-entropy over label tokens, and the number of label tokens."""
    if use_liger_for(hidden, use_liger):
        from lmf.loss.chunked import linear_params

        if linear_params(lm_head) is not None:
            return _liger_causal_lm_loss(hidden, lm_head, labels, softcap)
        _log_once("liger-head", "enable_liger_kernel: the LM head is not a plain nn.Linear; using the chunked loss")
        chunk_size = chunk_size or 1024
    if chunk_size:
        from lmf.loss.chunked import chunked_causal_lm_loss

        return chunked_causal_lm_loss(hidden, lm_head, labels, chunk_size, softcap=softcap)
    import torch.nn.functional as F

    h, y = _shift(hidden, labels)
    logits = _plain_logits(h, lm_head, softcap)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
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
