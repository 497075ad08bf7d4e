"""Chunked linear + cross-entropy: the loss without ever holding ``[tokens, vocab]`` logits.

With a real vocabulary (151,936 tokens for Qwen3) the fp32 logits of one 8k-token sequence are
~5 GB and their gradient as much again. Here the logits exist only ``chunk_size`` rows at a time:

1. Only label positions are computed: the hidden rows whose next-token label is not ``-100`` are
   gathered first (masked prompt tokens cost nothing).
2. Each chunk of rows is projected (``rows @ W.T`` in the weight's dtype, upcast to fp32), and
   ``logsumexp``, the target log-prob and the gradient wrt the logits are computed in place.
3. ``causal_lm_loss`` (a scalar) computes its gradients in the forward pass — the
   "gradient in forward" trick of Liger / cut-cross-entropy — and its backward only scales
   them by the incoming scalar: three matmuls, the same as the plain path.
   ``sequence_logps`` (per-sequence outputs, whose upstream gradient is not known in the forward)
   stores the gradient wrt the hidden rows when the LM head is frozen (LoRA, the common case),
   and otherwise recomputes each chunk's logits in the backward.

Memory is O(chunk_size x vocab) whatever the sequence length. Gradients wrt the weight are
accumulated in fp32 and returned in the weight's dtype; tied embeddings work because autograd
adds this gradient to the embedding's. Not differentiable twice.

``lm_head`` modules that are not a plain ``nn.Linear`` (a LoRA-adapted head, a wrapped or
sharded weight) take a generic path: the module itself is called per chunk under activation
checkpointing, which gives the same O(chunk x vocab) memory at the cost of a recomputation.
"""

from __future__ import annotations

import functools

from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lmf.extras.constants import IGNORE_INDEX
from lmf.loss.onednn import matmul_nt


# --------------------------------------------------------------------------------------------
# helpers


def select_label_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """Gather the hidden rows that predict a label (next-token shift applied).

    Returns ``rows [N, H]``, ``targets [N]``, ``row_seq [N]`` (the sequence of each row) and the
    per-sequence label counts ``[B]``.
    """
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"expected hidden [B, T, H] and labels [B, T]; got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    batch, seq_len, width = hidden.shape
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    seq_idx, pos_idx = mask.nonzero(as_tuple=True)
    rows = hidden.reshape(batch * seq_len, width).index_select(0, seq_idx * seq_len + pos_idx)
    return rows, shifted[seq_idx, pos_idx], seq_idx, mask.sum(-1)


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    if not targets.numel():
        return
    low, high = torch.stack([targets.min(), targets.max()]).tolist()  # one device sync
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"label id {bad} is outside the LM head's vocabulary [0, {vocab_size}) "
            f"(labels must be token ids or {IGNORE_INDEX}); is the tokenizer the model's own?"
        )


def linear_params(lm_head: nn.Module):
    """``(weight, bias)`` when ``lm_head`` is a plain linear projection, else ``None``."""
    if type(lm_head).forward is not nn.Linear.forward:
        return None
    weight = lm_head.weight
    if type(weight) not in (torch.Tensor, nn.Parameter):  # DTensor, quantized or other subclasses
        return None
    return weight, lm_head.bias


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device_type = weight.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # older torch: no device_type argument
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return weight.dtype


def _chunk_logits(rows, weight, bias, softcap):
    """fp32 logits of one chunk (and ``tanh(z / softcap)`` when softcapping, for the backward)."""
    logits = matmul_nt(rows, weight).float()
    if bias is not None:
        logits += bias.float()
    capped = None
    if softcap:
        logits.div_(softcap).tanh_()
        capped = logits.clone()
        logits.mul_(softcap)
    return logits, capped


def _softmax_inplace(logits):
    """Turn fp32 logits into probabilities in place; return their ``logsumexp`` ``[C]``."""
    row_max = logits.amax(dim=1, keepdim=True)
    logits.sub_(row_max).exp_()
    total = logits.sum(dim=1, keepdim=True)
    logits.div_(total)
    return (row_max + total.log()).squeeze(1)


def _apply_softcap_grad(grad_logits, capped):
    """Chain rule through ``softcap * tanh(z / softcap)``: multiply by ``1 - tanh^2``."""
    if capped is not None:
        grad_logits.mul_(capped.square_().neg_().add_(1.0))


def _accumulate_param_grads(grad_logits, rows, grad_weight, grad_bias):
    """``grad_weight += grad_logits^T @ rows`` (fp32 accumulator), ``grad_bias += sum``."""
    if grad_weight is not None:
        if grad_weight.dtype == grad_logits.dtype == rows.dtype:
            grad_weight.addmm_(grad_logits.t(), rows)
        else:
            grad_weight.add_(grad_logits.t() @ rows)  # upcast in place: no [V, H] fp32 temporary
    if grad_bias is not None:
        grad_bias += grad_logits.float().sum(0)


# --------------------------------------------------------------------------------------------
# autograd functions


def _scaled(grad, scale, dtype):
    """``grad * scale`` in ``dtype`` without an extra full-size temporary; ``grad`` (saved) is untouched."""
    if grad is None:
        return None
    if grad.dtype == dtype:
        return grad * scale
    return grad.to(dtype).mul_(scale)


class LinearCrossEntropySum(torch.autograd.Function):
    """``sum_i CE(rows_i @ W.T + b, targets_i)`` with gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size, softcap, compute_dtype, needs, smoothing=0.0):
        need_rows, need_weight, need_bias = needs
        ctx.dtypes = (rows.dtype, weight.dtype, bias.dtype if bias is not None else None)
        device_type = rows.device.type
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32, device=rows.device)
            grad_rows = torch.empty_like(rows) if need_rows else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            any_grad = need_rows or need_weight or need_bias
            for start in range(0, rows.shape[0], chunk_size):
                h = rows[start:start + chunk_size].to(compute_dtype)
                t = targets[start:start + chunk_size]
                logits, capped = _chunk_logits(h, w, bias, softcap)
                target_logit = logits.gather(1, t.unsqueeze(1)).squeeze(1)
                mean_logit = logits.mean(1) if smoothing else None
                lse = _softmax_inplace(logits)  # logits now hold softmax probabilities
                if smoothing:  # (1 - e) * CE + e * mean over the vocabulary of -log p (transformers' LabelSmoother)
                    total += (lse - (1.0 - smoothing) * target_logit - smoothing * mean_logit).sum()
                else:
                    total += (lse - target_logit).sum()
                if any_grad:
                    # p - onehot = dCE/dlogits; smoothed: p - (1 - e) * onehot - e / V
                    logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0 - smoothing
                    if smoothing:
                        logits.sub_(smoothing / logits.shape[1])
                    _apply_softcap_grad(logits, capped)
                    grad_logits = logits.to(compute_dtype)
                    if need_rows:
                        grad_rows[start:start + chunk_size] = matmul_nt(grad_logits, w.t())
                    _accumulate_param_grads(grad_logits, h, grad_weight, grad_bias)
                    del grad_logits
                del logits, capped  # free this chunk's [C, V] buffers before the next one is allocated
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        rows_dtype, weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.float()
        return (_scaled(grad_rows, scale, rows_dtype), _scaled(grad_weight, scale, weight_dtype),
                _scaled(grad_bias, scale, bias_dtype), None, None, None, None, None, None)


class LinearTargetLogProbs(torch.autograd.Function):
    """Per-row ``log_softmax(rows_i @ W.T + b)[targets_i]`` ``[N]`` (fp32)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size, softcap, compute_dtype, needs):
        need_rows, need_weight, need_bias = needs
        # Frozen head: the upstream gradient only scales each row, so store d logp / d row now.
        store_row_grads = need_rows and not (need_weight or need_bias)
        ctx.dtypes = (rows.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.config = (chunk_size, softcap, compute_dtype, needs, store_row_grads)
        device_type = rows.device.type
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            logps = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
            lses = torch.empty_like(logps)
            row_grads = torch.empty_like(rows) if store_row_grads else None
            for start in range(0, rows.shape[0], chunk_size):
                h = rows[start:start + chunk_size].to(compute_dtype)
                t = targets[start:start + chunk_size]
                logits, capped = _chunk_logits(h, w, bias, softcap)
                target_logit = logits.gather(1, t.unsqueeze(1)).squeeze(1)
                lse = _softmax_inplace(logits)
                logps[start:start + chunk_size] = target_logit - lse
                lses[start:start + chunk_size] = lse
                if store_row_grads:
                    logits.neg_()[torch.arange(t.shape[0], device=t.device), t] += 1.0  # onehot - p
                    _apply_softcap_grad(logits, capped)
                    row_grads[start:start + chunk_size] = matmul_nt(logits.to(compute_dtype), w.t())
                del logits, capped  # free this chunk's [C, V] buffers before the next one is allocated
        if store_row_grads:
            ctx.save_for_backward(row_grads)
        else:
            ctx.save_for_backward(rows, weight, bias, targets, lses)
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps):
        chunk_size, softcap, compute_dtype, needs, store_row_grads = ctx.config
        need_rows, need_weight, need_bias = needs
        rows_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if store_row_grads:
            (row_grads,) = ctx.saved_tensors
            grad_rows = (row_grads.float() * grad_logps.unsqueeze(1)).to(rows_dtype)
            return grad_rows, None, None, None, None, None, None, None

        rows, weight, bias, targets, lses = ctx.saved_tensors
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        w = weight.to(compute_dtype)
        for start in range(0, rows.shape[0], chunk_size):
            h = rows[start:start + chunk_size].to(compute_dtype)
            t = targets[start:start + chunk_size]
            g = grad_logps[start:start + chunk_size].float().unsqueeze(1)
            logits, capped = _chunk_logits(h, w, bias, softcap)
            grad_logits = logits.sub_(lses[start:start + chunk_size].unsqueeze(1)).exp_().neg_()  # -p
            grad_logits[torch.arange(t.shape[0], device=t.device), t] += 1.0  # onehot - p
            grad_logits.mul_(g)
            _apply_softcap_grad(grad_logits, capped)
            grad_logits = grad_logits.to(compute_dtype)
            if need_rows:
                grad_rows[start:start + chunk_size] = matmul_nt(grad_logits, w.t())
            _accumulate_param_grads(grad_logits, h, grad_weight, grad_bias)
            del logits, capped, grad_logits  # free this chunk's [C, V] buffers before the next one
        if grad_rows is not None:
            grad_rows = grad_rows.to(rows_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return grad_rows, grad_weight, grad_bias, None, None, None, None, None


def _needs(rows, weight, bias):
    grad_on = torch.is_grad_enabled()
    return (
        grad_on and rows.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )


# --------------------------------------------------------------------------------------------
# generic path: any lm_head module, called per chunk under activation checkpointing


def _module_logits(lm_head, rows, softcap):
    logits = lm_head(rows).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _module_ce_sum(rows, targets, lm_head, softcap, smoothing=0.0):
    logits = _module_logits(lm_head, rows, softcap)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum", label_smoothing=smoothing)


def _module_target_logps(rows, targets, lm_head, softcap):
    logits = _module_logits(lm_head, rows, softcap)
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=1)


def _per_chunk_checkpointed(fn, rows, targets, lm_head, chunk_size, softcap):
    from torch.utils.checkpoint import checkpoint

    outs = []
    for start in range(0, rows.shape[0], chunk_size):
        args = (rows[start:start + chunk_size], targets[start:start + chunk_size], lm_head, softcap)
        outs.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return outs


# --------------------------------------------------------------------------------------------
# public API


def _vocab_size(lm_head) -> Optional[int]:
    size = getattr(lm_head, "out_features", None)
    if size is None and isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        size = lm_head.weight.shape[0]
    return size


def _zero_connected(rows, lm_head):
    """A zero that keeps ``rows`` and the head's trainable parameters in the graph (zero grads)."""
    zero = rows.sum().float() * 0.0
    for param in lm_head.parameters():
        if param.requires_grad:
            zero = zero + param.sum().float() * 0.0
    return zero


def _validate_chunk_size(chunk_size) -> int:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"loss chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def chunked_causal_lm_loss(hidden, lm_head, labels, chunk_size: int, softcap: Optional[float] = None,
                           label_smoothing: float = 0.0):
    """Sum of next-token cross-entropy over label tokens, and their count; same contract as
    :func:`lmf.loss.causal_lm_loss`, computed ``chunk_size`` label tokens at a time."""
    chunk_size = _validate_chunk_size(chunk_size)
    rows, targets, _, counts = select_label_rows(hidden, labels)
    num_tokens = counts.sum()
    params = linear_params(lm_head)
    if params is None:
        if _vocab_size(lm_head) is not None:
            _check_targets(targets, _vocab_size(lm_head))
        ce_sum = functools.partial(_module_ce_sum, smoothing=label_smoothing) if label_smoothing else _module_ce_sum
        outs = _per_chunk_checkpointed(ce_sum, rows, targets, lm_head, chunk_size, softcap)
        loss_sum = torch.stack(outs).sum() if outs else _zero_connected(rows, lm_head)
        return loss_sum, num_tokens
    weight, bias = params
    _check_targets(targets, weight.shape[0])
    needs = _needs(rows, weight, bias)
    loss_sum = LinearCrossEntropySum.apply(
        rows, weight, bias, targets, chunk_size, softcap, _compute_dtype(weight), needs, float(label_smoothing)
    )
    return loss_sum, num_tokens


def chunked_token_logps(hidden, lm_head, labels, chunk_size: int, softcap: Optional[float] = None):
    """Log-probs ``[N]`` (fp32) of the ``N`` label tokens and their sequence index ``[N]``, ``chunk_size``
    tokens at a time (the building block of :func:`chunked_sequence_logps` and of the DFT loss)."""
    chunk_size = _validate_chunk_size(chunk_size)
    rows, targets, row_seq, _ = select_label_rows(hidden, labels)
    params = linear_params(lm_head)
    if params is None:
        if _vocab_size(lm_head) is not None:
            _check_targets(targets, _vocab_size(lm_head))
        outs = _per_chunk_checkpointed(_module_target_logps, rows, targets, lm_head, chunk_size, softcap)
        return (torch.cat(outs) if outs else rows.sum(-1).float() * 0.0 + _zero_connected(rows, lm_head)), row_seq
    weight, bias = params
    _check_targets(targets, weight.shape[0])
    needs = _needs(rows, weight, bias)
    return LinearTargetLogProbs.apply(rows, weight, bias, targets, chunk_size, softcap, _compute_dtype(weight),
                                      needs), row_seq


def chunked_sequence_logps(hidden, lm_head, labels, chunk_size: int, softcap: Optional[float] = None):
    """Per-sequence sum of label-token log-probs ``[B]`` (fp32) and label counts ``[B]``; same
    contract as :func:`lmf.loss.sequence_logps`, computed ``chunk_size`` tokens at a time."""
    row_logps, row_seq = chunked_token_logps(hidden, lm_head, labels, chunk_size, softcap)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    logps_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, row_seq, row_logps)
    return logps_sum, counts
