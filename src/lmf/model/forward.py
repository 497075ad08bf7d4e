"""The forward pass every stage trains through: final hidden states of a (PEFT-wrapped) causal LM.

- :func:`decoder_hidden_states` -> ``[B, T, H]`` after the final norm, without logits (the losses in
  :mod:`lmf.loss` project them chunk by chunk); packed rows and padding-free batches run per sample.
- :func:`lm_head_of`, :func:`unwrap_causal_lm`, :func:`logit_softcap_of`: what the losses need of the model.
- :func:`set_padding_free`: the ``padding_free`` switch, set once per model.

Call these on the *unwrapped* model (not on the DDP/FSDP wrapper); the trainer wraps a module whose
``forward`` calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lmf.model.mixture_of_depths import routes_positions
from lmf.model.vision import is_vision_config

if TYPE_CHECKING:
    import torch
    from torch import nn


def unwrap_causal_lm(model):
    """The underlying ``*ForCausalLM`` module of a PEFT-wrapped (or plain) model."""
    inner = model
    # PeftModel -> LoraModel -> *ForCausalLM
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def decoder_of(causal_lm):
    """The decoder stack (``*Model``) under a ``*ForCausalLM``: ``get_decoder()``, unless it returns the causal LM
    itself (Llama-4 text does), then its ``model``."""
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if decoder is None or decoder is causal_lm:
        decoder = getattr(causal_lm, "model", causal_lm)
    return decoder


PADDING_FREE_ATTR = "_lmf_padding_free"
#: ``moe_aux_loss_coef``: the causal LM's flag that makes the decoder return its router logits, and where the last
#: trained forward leaves them for :func:`pop_router_logits`.
ROUTER_LOGITS_FLAG = "_lmf_router_aux_loss"
ROUTER_LOGITS_ATTR = "_lmf_router_logits"


def set_router_logits(model, enabled: bool) -> None:
    """Make :func:`decoder_hidden_states` ask the decoder for its router logits (MoE auxiliary loss)."""
    setattr(unwrap_causal_lm(model), ROUTER_LOGITS_FLAG, bool(enabled))


def _grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def pop_router_logits(model):
    """The router logits of ``model``'s last trained forward (one tensor per MoE layer), or None; cleared."""
    causal_lm = unwrap_causal_lm(model)
    logits = getattr(causal_lm, ROUTER_LOGITS_ATTR, None)
    if logits is not None:
        setattr(causal_lm, ROUTER_LOGITS_ATTR, None)
    return logits
PACKED_SDPA_ATTR = "_lmf_packed_sdpa"


def set_padding_free(model, enabled: bool) -> None:
    """Turn :func:`decoder_hidden_states`'s padding-free path on or off for ``model`` (on by default).

    A plain attribute of the underlying causal LM (never saved with the weights): the config key
    ``padding_free`` sets it once, for every stage (SFT, DPO, RM) and its reference scoring.
    """
    setattr(unwrap_causal_lm(model), PADDING_FREE_ATTR, bool(enabled))


def set_packed_sdpa(model, enabled: bool) -> None:
    """Turn the per-segment sdpa of packed rows and padding-free batches on or off (config key ``packed_sdpa``)."""
    setattr(unwrap_causal_lm(model), PACKED_SDPA_ATTR, bool(enabled))


def is_vision_language(model) -> bool:
    """Whether ``model`` (possibly PEFT-wrapped) is a multimodal model (its config has a vision or audio tower's)."""
    return is_vision_config(getattr(unwrap_causal_lm(model), "config", None))


def _vision_language_hidden_states(causal_lm, input_ids, attention_mask, mm_inputs: Optional[dict]):
    """The multimodal model under a ``*ForConditionalGeneration`` (vision tower, projector, language model) on a
    padded batch: it places the image features at the vision tokens and computes its own (M-RoPE) positions."""
    out = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **(mm_inputs or {}))
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def decoder_hidden_states(model, input_ids, attention_mask=None, position_ids=None,
                          mm_inputs: Optional[dict] = None) -> "torch.Tensor":
    """Final-norm hidden states of the decoder stack ``[B, T, H]``, without computing logits.

    A vision-language model runs its multimodal model with ``mm_inputs`` (``pixel_values``, ``image_grid_thw``,
    ``mm_token_type_ids``: :class:`lmf.data.media.collator.MediaCollator`) on the padded batch, as it is.

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
    config = getattr(causal_lm, "config", None)
    if is_vision_language(causal_lm):
        return _vision_language_hidden_states(causal_lm, input_ids, attention_mask, mm_inputs)
    decoder = decoder_of(causal_lm)
    flat = _padding_free_layout(causal_lm, config, input_ids, attention_mask, position_ids)
    batch_ids = input_ids
    if flat is not None:  # one row of the real tokens; position ids restart at each sample
        keep, position_ids = flat
        input_ids = input_ids.reshape(-1).index_select(0, keep).unsqueeze(0)
    if position_ids is not None:
        attention_mask = None
    elif attention_mask is not None and _right_padded_cpu(attention_mask) and not routes_positions(config):
        attention_mask = None  # causal attention never looks at the padding after a row's last token
    extra = {"output_router_logits": True} if getattr(causal_lm, ROUTER_LOGITS_FLAG, False) else {}
    if position_ids is None:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    else:
        from lmf.model.packed_attention import packed_sdpa

        with packed_sdpa(config, position_ids, enabled=getattr(causal_lm, PACKED_SDPA_ATTR, True)) as attn_kwargs:
            out = decoder(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False, **extra,
                          **attn_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    router_logits = getattr(out, "router_logits", None)
    if router_logits is not None and _grad_enabled():  # the trained forward, not a reference's
        setattr(causal_lm, ROUTER_LOGITS_ATTR, router_logits)
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
    if not supports(config, input_ids.device, enabled=getattr(causal_lm, PACKED_SDPA_ATTR, True)):
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


def logit_softcap_of(model) -> Optional[float]:
    """The final-logit softcapping of a model's config (gemma2), else ``None``."""
    config = getattr(unwrap_causal_lm(model), "config", None)
    getter = getattr(config, "get_text_config", None)
    text_config = getter() if callable(getter) else config
    return getattr(text_config, "final_logit_softcapping", None) or None
