"""Per-sample ("varlen") sdpa attention for packed rows, without a dense ``[T, T]`` mask.

A packed row holds several samples, with ``position_ids`` restarting at 0 at every sample
boundary (right padding gets 0s, so every pad token is a segment of its own). transformers
(sdpa) turns such position ids into a dense block-diagonal causal mask ``[B, 1, T, T]``: the
masked sdpa kernel then does ``T^2`` work per row instead of ``sum(L_i^2)``.

This module computes exactly the same attention segment by segment:

- :func:`packed_segments` reads the segment boundaries from ``position_ids`` once per batch (a
  new segment starts wherever the position id is not the previous one + 1, as transformers'
  ``find_packed_sequence_indices``), sorts the segments by length and groups them into a few
  buckets of similar length. Each bucket is a ``[n, heads, L_bucket, head_dim]`` batch of
  right-padded segments, so one causal sdpa call (no mask: the fused kernel) covers the whole
  bucket; a real query only sees earlier positions of its own segment, never a bucket pad.
- :func:`packed_sdpa` (the context manager used by ``lmf.model.forward.decoder_hidden_states``) passes
  the :class:`PackedSegments` to every attention layer through the model's ``**kwargs`` (like the
  flash-attention path's ``cu_seq_lens_q``) under the key ``lmf_packed_segments``, and stops the
  block mask from being built while the decoder runs.
- Mechanism: transformers' ``"sdpa"`` entries of ``AttentionInterface`` and
  ``AttentionMaskInterface`` are wrapped once per process (:func:`install`). The attention wrapper
  runs the per-segment path only when a call carries ``lmf_packed_segments`` and is transformers'
  own ``sdpa_attention_forward`` otherwise; the mask wrapper returns ``None`` (no mask) only
  inside :func:`packed_sdpa`. So generation/chat and unpacked batches are untouched, and with
  gradient checkpointing the recomputed layers get the same kwargs and the same attention.

Used only where it applies: ``position_ids`` of shape ``[B, T]`` on CPU or CUDA, the model's
``attn_implementation`` is ``sdpa``, a decoder whose layers are all full attention (no sliding
window) from :data:`SUPPORTED_MODEL_TYPES`. flash_attention_2 keeps transformers' own varlen path,
eager/flex keep the mask. The config key ``packed_sdpa: false`` turns it off (the mask path).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KWARG = "lmf_packed_segments"

# Decoders whose attention layers forward **kwargs to the attention function and build their mask
# with masking_utils (so both "sdpa" wrappers below see every call).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral"})

# A segment joins the current bucket while its length is at least this fraction of the bucket's
# (longest) length: at most 1/0.75^2 = 1.8x the attention work for the shortest member.
BUCKET_FILL = 0.75

_SKIP_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar("lmf_packed_sdpa_skip_mask", default=False)
_ORIGINALS: dict = {}


class PackedSegments:
    """Where each token of a packed batch goes, for one batch (any layer), in one of two layouts.

    Buckets (``spans`` is None): ``gather_index[p]``: flat token index (into ``B * T``) of padded
    slot ``p`` (bucket pads point at token 0 and are never read back); ``scatter_index[t]``: slot of
    flat token ``t``; ``buckets``: ``(segments, padded_length)`` per bucket, in slot order.
    Spans: ``spans`` holds ``(flat start, length)`` of every segment in token order; each segment
    is attended to as a slice of the layer's tensors (no gather, no scatter, no bucket padding).
    ``calls``: attention layers that used it. A plain object, not a dataclass: wrappers that copy
    dataclasses found in a layer's kwargs (FSDP's input casting) pass it through as is.
    """

    __slots__ = ("batch_size", "buckets", "calls", "gather_index", "num_segments", "scatter_index", "seq_len",
                 "spans")

    def __init__(self, gather_index, scatter_index, buckets: tuple, batch_size: int, seq_len: int,
                 num_segments: int, spans: tuple | None = None) -> None:
        self.gather_index = gather_index
        self.scatter_index = scatter_index
        self.buckets = buckets
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.num_segments = num_segments
        self.spans = spans
        self.calls = 0

    def __repr__(self) -> str:
        layout = f"buckets {self.buckets}" if self.spans is None else "one call per segment"
        return f"PackedSegments({self.batch_size}x{self.seq_len} tokens, {self.num_segments} segments, {layout})"


#: On CPU, segments averaging at least this many tokens are attended to one by one (slices, no copies);
#: shorter ones (1-token padding segments, many tiny samples) and CUDA batches use length buckets.
MIN_MEAN_SPAN = 32


def packed_segments(position_ids: torch.Tensor, fill: float = BUCKET_FILL, layout: str = "auto") -> PackedSegments:
    """Segments of a packed ``[B, T]`` ``position_ids`` batch, bucketed by length or as spans.

    ``layout``: ``"buckets"``, ``"spans"``, or ``"auto"`` (spans on CPU when segments average at least
    :data:`MIN_MEAN_SPAN` tokens: one sdpa call per segment costs less there than the copies into and
    out of buckets; buckets otherwise, where fewer, larger kernel launches win)."""
    import torch

    batch_size, seq_len = position_ids.shape
    pos = position_ids.detach().to("cpu", torch.long)
    starts_mask = torch.ones_like(pos, dtype=torch.bool)
    starts_mask[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # every row starts a segment: none spans rows
    starts = starts_mask.flatten().nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([batch_size * seq_len]))
    if layout == "auto":
        mean_length = batch_size * seq_len / max(len(starts), 1)
        layout = "spans" if position_ids.device.type == "cpu" and mean_length >= MIN_MEAN_SPAN else "buckets"
    if layout == "spans":
        return PackedSegments(None, None, (), batch_size, seq_len, len(starts),
                              spans=tuple(zip(starts.tolist(), lengths.tolist())))
    if layout != "buckets":
        raise ValueError(f"layout must be auto, buckets or spans, got {layout!r}")

    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    lengths_list = lengths.tolist()
    buckets: list = []
    gather_parts = []
    slot_start = torch.empty_like(starts)
    offset = 0
    i = 0
    while i < len(order):
        padded = lengths_list[order[i]]
        j = i
        while j < len(order) and lengths_list[order[j]] >= fill * padded:
            j += 1
        members = torch.tensor(order[i:j])
        n = j - i
        steps = torch.arange(padded)
        index = starts[members, None] + steps[None, :]
        index = torch.where(steps[None, :] < lengths[members, None], index, torch.zeros_like(index))
        gather_parts.append(index.flatten())
        slot_start[members] = offset + torch.arange(n) * padded
        buckets.append((n, padded))
        offset += n * padded
        i = j

    segment_of_token = starts_mask.flatten().cumsum(0) - 1
    token = torch.arange(batch_size * seq_len)
    scatter_index = slot_start[segment_of_token] + (token - starts[segment_of_token])
    device = position_ids.device
    return PackedSegments(
        gather_index=torch.cat(gather_parts).to(device, non_blocking=True),
        scatter_index=scatter_index.to(device, non_blocking=True),
        buckets=tuple(buckets),
        batch_size=batch_size,
        seq_len=seq_len,
        num_segments=len(order),
    )


def varlen_sdpa_forward(module, query, key, value, segments: PackedSegments, dropout: float = 0.0,
                        scaling: float | None = None) -> torch.Tensor:
    """Causal sdpa within each segment. ``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, T, D*]``
    -> ``[B, T, Hq, Dv]`` (transformers' attention-output layout)."""
    import torch
    import torch.nn.functional as F

    batch_size, num_heads, seq_len, _ = query.shape
    if (batch_size, seq_len) != (segments.batch_size, segments.seq_len):
        raise ValueError(f"packed segments were computed for {segments.batch_size}x{segments.seq_len} tokens, "
                         f"attention got {batch_size}x{seq_len}")
    num_kv_heads = key.shape[1]
    gqa = num_kv_heads != num_heads
    if segments.spans is not None:
        return _spans_sdpa(query, key, value, segments.spans, dropout, scaling, gqa)

    def gather(x):  # [B, H, T, D] -> [slots, H, D]
        return x.transpose(1, 2).reshape(batch_size * seq_len, x.shape[1], x.shape[3]).index_select(
            0, segments.gather_index)

    slots_qkv = (gather(query), gather(key), gather(value))
    outputs = []
    offset = 0
    for n, padded in segments.buckets:
        size = n * padded
        # [slots, H, D] -> [n, H, padded, D]
        q, k, v = (x[offset:offset + size].view(n, padded, x.shape[1], x.shape[2]).transpose(1, 2) for x in slots_qkv)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=padded > 1,
                                             enable_gqa=gqa)
        outputs.append(out.transpose(1, 2).reshape(size, num_heads, out.shape[-1]))
        offset += size
    slots = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return slots.index_select(0, segments.scatter_index).view(batch_size, seq_len, num_heads, slots.shape[-1])


def _spans_sdpa(query, key, value, spans, dropout: float, scaling, gqa: bool):
    """Causal sdpa on each segment's slice of ``[B, H, T, D]``; outputs concatenated in token order."""
    import torch
    import torch.nn.functional as F

    batch_size, num_heads, seq_len, _ = query.shape
    outputs = []
    for start, length in spans:
        row, first = divmod(start, seq_len)
        window = (slice(row, row + 1), slice(None), slice(first, first + length))
        out = F.scaled_dot_product_attention(query[window], key[window], value[window], dropout_p=dropout,
                                             scale=scaling, is_causal=length > 1, enable_gqa=gqa)
        outputs.append(out.transpose(1, 2))  # [1, L, H, Dv]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return out.reshape(batch_size, seq_len, num_heads, out.shape[-1])


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The ``"sdpa"`` attention entry: per-segment when the call carries packed segments."""
    segments = kwargs.get(KWARG)
    if segments is None:
        return _ORIGINALS["attention"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None or attention_mask is not None:
        raise RuntimeError("lmf packed sdpa: this attention layer needs a mask (sliding window / softcap); "
                           "set packed_sdpa: false")
    segments.calls += 1
    return varlen_sdpa_forward(module, query, key, value, segments, dropout=dropout, scaling=scaling), None


def _mask(*args, **kwargs):
    """The ``"sdpa"`` mask entry: no mask at all while a packed batch runs (see :func:`packed_sdpa`)."""
    if _SKIP_MASK.get():
        return None
    return _ORIGINALS["mask"](*args, **kwargs)


def install() -> None:
    """Wrap transformers' ``"sdpa"`` attention and mask entries (idempotent; see the module docstring)."""
    if _ORIGINALS:
        return
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    _ORIGINALS["attention"] = AttentionInterface._global_mapping["sdpa"]
    _ORIGINALS["mask"] = AttentionMaskInterface._global_mapping["sdpa"]
    AttentionInterface.register("sdpa", _attention)
    AttentionMaskInterface.register("sdpa", _mask)


def supports(config, device, enabled: bool = True) -> bool:
    """Whether this model, on this device, can run attention per segment (``enabled``: config key ``packed_sdpa``)."""
    if not enabled or config is None or getattr(device, "type", device) not in ("cpu", "cuda"):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(text_config, "sliding_window", None) is None


def applies(config, position_ids, enabled: bool = True) -> bool:
    """Whether a packed batch of this model can take the per-segment path."""
    if position_ids is None or position_ids.dim() != 2:
        return False
    return supports(config, position_ids.device, enabled)


@contextlib.contextmanager
def packed_sdpa(config, position_ids, enabled: bool = True):
    """Around one decoder forward of a packed batch: yields the extra decoder kwargs (``{}`` when
    the per-segment path does not apply, then nothing changes).

    Raises ``RuntimeError`` when no attention layer received the segments (the model did not
    forward them: its attention would have been unmasked)."""
    if not applies(config, position_ids, enabled):
        yield {}
        return
    install()
    segments = packed_segments(position_ids)
    token = _SKIP_MASK.set(True)
    try:
        yield {KWARG: segments}
    finally:
        _SKIP_MASK.reset(token)
    if segments.calls == 0:
        raise RuntimeError(f"lmf packed sdpa: {getattr(config, 'model_type', '?')} did not pass the packed segments "
                           "to its attention layers; set packed_sdpa: false")
