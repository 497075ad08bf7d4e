"""LongLoRA's shift short attention (S²-Attn), the ``shift_attn`` key, on transformers' attention interface.

In training, each attention layer attends within groups of a quarter of the row (``g = L / 4``, LongLoRA's and
LLaMA-Factory's ``group_size_ratio``): half of the heads over the groups ``[0, g), [g, 2g), ...``, the other half over
groups shifted by ``g / 2`` (``[g/2, 3g/2), ...``), so information flows between neighbouring groups; the work is
``L * g`` instead of ``L^2``. Outside training (evaluation, generation, chat) the same model attends over the whole row
with transformers' sdpa, as LongLoRA intends (train short, serve full).

Where lmf deviates from LLaMA-Factory (which patches ``LlamaAttention`` of transformers 4.45-4.47 only), on purpose:

- the shifted heads' output is shifted back over the whole row, as LongLoRA's paper and reference code do
  (LLaMA-Factory's patch discards the reshape before rolling back, so it rolls within each group: the output of those
  heads lands ``g / 2`` positions off in every group);
- the shift does not wrap around: LongLoRA rolls the row, which puts its last ``g / 2`` positions and its first ``g / 2``
  in one group, where a causal mask over group positions lets the first tokens of the row attend to its last ones (a
  look at the future). Here those two half groups stay apart (``group(p) = (p + g/2) // g``);
- the row's own mask is kept: padding and any other mask transformers builds are combined with the groups;
- any row length: the row is padded inside the layer to a multiple of the (even) group size (LLaMA-Factory asserts
  that a quarter of the row divides it);
- any decoder of :data:`SUPPORTED_MODEL_TYPES` whose layers are all full attention, not only Llama.

Mechanism: the function is registered under :data:`IMPLEMENTATION` in transformers' ``AttentionInterface`` (and sdpa's
mask function under the same name in ``AttentionMaskInterface``), and the model is loaded with that
``attn_implementation`` (``lmf.model.loader``).
"""

from __future__ import annotations

from typing import Optional

from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger
from lmf.model.packed_attention import SUPPORTED_MODEL_TYPES  # decoders whose layers pass **kwargs to attention

logger = get_logger(__name__)

IMPLEMENTATION = "lmf_shift_short"
GROUP_SIZE_RATIO = 0.25


def unsupported_reason(config: dict) -> Optional[str]:
    """Why the model of this config.json (a dict) cannot train with S²-Attn, or None."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (shift_attn supports {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
    layer_types = config.get("layer_types")
    if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
        return "a model with sliding-window layers"
    if layer_types is None and config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        return "a model with sliding-window attention"
    if config.get("num_attention_heads", 0) % 2:
        return f"{config['num_attention_heads']} attention heads (S²-Attn shifts half of them)"
    return None


def attn_implementation_for(config: dict) -> str:
    """``shift_attn`` in training: the attn_implementation to load the model of this config.json with."""
    reason = unsupported_reason(config)
    if reason:
        raise ConfigError(f"config key 'shift_attn' is not implemented for {reason}")
    install()
    logger.info("shift_attn: S²-Attn in training (groups of a quarter of each row, half of the heads shifted by half "
                "a group); evaluation and generation attend over the whole row")
    return IMPLEMENTATION


def install() -> None:
    """Register the S²-Attn attention function and sdpa's mask function under :data:`IMPLEMENTATION` (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, shift_short_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def group_size(length: int) -> int:
    """Positions per group for a row of ``length``: a quarter of it, even, at least 2."""
    quarter = -(-length // round(1 / GROUP_SIZE_RATIO))
    return max(2, quarter + quarter % 2)


def shift_short_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, H_kv, L, D]``;
    returns ``([B, L, H, D], None)``. Grouped attention in training on a full row, sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not module.training or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    output = grouped_attention(query, key, value, attention_mask, dropout=dropout, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def grouped_attention(query, key, value, attention_mask=None, dropout: float = 0.0, scale: Optional[float] = None):
    """S²-Attn on ``[B, H, L, D]`` tensors (``key``/``value`` may have fewer heads, repeated here); ``attention_mask``:
    None (causal) or a ``[B or 1, 1, L, L]`` mask (bool: True attends; float: 0 attends). Returns ``[B, H, L, D]``.

    The groups are contiguous slices of the row, so without a mask every group runs sdpa's causal kernel (no mask
    tensor); the shifted heads' groups are ``[0, g/2)``, ``[g/2, 3g/2)``, ..., ``[Lp - g/2, Lp)``."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    batch, heads, length, dim = query.shape
    key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    g = group_size(length)
    padded = -(-length // g) * g
    if padded != length:
        query, key, value = (F.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))
    half, shift = heads // 2, g // 2
    allowed = _bool_mask(attention_mask, length, padded)

    def attend(tensors, start: int, stop: int, size: int):
        """Heads' slice ``tensors`` ([B, h, Lp, D] each) over groups of ``size`` covering ``[start, stop)``."""
        count = (stop - start) // size
        q, k, v = (t[:, :, start:stop].reshape(batch, t.shape[1], count, size, dim).transpose(1, 2)
                   .reshape(batch * count, t.shape[1], size, dim) for t in tensors)
        mask = None if allowed is None else _group_masks(allowed, start, count, size, batch)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                             is_causal=mask is None)
        return out.reshape(batch, count, -1, size, dim).transpose(1, 2).reshape(batch, -1, stop - start, dim)

    plain = attend([t[:, :half] for t in (query, key, value)], 0, padded, g)
    shifted_heads = [t[:, half:] for t in (query, key, value)]
    pieces = [attend(shifted_heads, 0, shift, shift)]  # the row's first half group
    if padded > g:
        pieces.append(attend(shifted_heads, shift, padded - shift, g))
    pieces.append(attend(shifted_heads, padded - shift, padded, shift))  # its last: no wrap-around to the first
    shifted = torch.cat(pieces, dim=2)
    return torch.cat((plain, shifted), dim=1)[:, :, :length]


def _bool_mask(attention_mask, length: int, padded: int):
    """The row's mask as bool ``[B or 1, 1, Lp, Lp]`` (True attends; positions past ``length`` see nothing), or None
    (causal). A bool mask of the row's size is used as it is: no copy of the ``L x L`` mask."""
    import torch
    import torch.nn.functional as F

    if attention_mask is None:
        return None
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    allowed = allowed[:, :1, :length, :length]
    if padded > length:
        allowed = F.pad(allowed, (0, padded - length, 0, padded - length), value=False)
    return allowed.contiguous()


def _group_masks(allowed, start: int, count: int, size: int, batch: int):
    """The ``count`` diagonal ``size x size`` blocks of ``allowed`` from ``start``, as ``[B * count, 1, size, size]``
    (read through a strided view: only the blocks are copied); each position may see itself, so a group of padding
    alone attends to something (no NaN)."""
    import torch

    side = allowed.shape[-1]
    blocks = allowed.as_strided((allowed.shape[0], count, size, size), (allowed.stride(0), size * side + size, side, 1),
                                allowed.storage_offset() + start * side + start)
    blocks = blocks | torch.eye(size, dtype=torch.bool, device=allowed.device)
    return blocks.expand(batch, -1, -1, -1).reshape(batch * count, 1, size, size)
