"""Fused LoRA linear for training: one autograd node per adapted ``nn.Linear``.

peft's ``lora.Linear.forward`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as five
autograd nodes, three of which write a full ``[tokens, out_features]`` tensor (``lora_B``'s output,
the scaled copy and the sum); the backward adds two ``[tokens, in_features]`` input gradients. On
a small model or a long sequence those elementwise passes cost as much as the matmuls around them.

:class:`LoraLinearFunction` computes the same ``y = x W^T + b + s (x A^T) B^T`` with one output
tensor (``addmm`` for the frozen base, then an in-place ``addmm_`` of the low-rank update), saves
``x`` and ``xa = x A^T`` (``[tokens, r]``), and in the backward::

    gB = g B                      [tokens, r]
    dx = g W + s gB A             (one mm, one in-place addmm)
    dA = s gB^T x,   dB = s g^T xa

:func:`fuse_lora_layers` gives every peft ``lora.Linear`` of a model a forward that takes this path
when the call is the plain LoRA case and is peft's own forward otherwise, decided per call: adapters
disabled (DPO's reference pass), merged, several active adapters, per-call ``adapter_names``, LoRA
variants (DoRA, ...), ``lora_dropout`` > 0 in training, a LoRA bias, a trainable or non-plain base
weight (quantised, DTensor), mixed dtypes and autocast all keep peft's forward. So nothing about
the model changes but the number of kernels and temporaries: same parameters, same state dict,
same adapter files. The config key ``fused_lora: false`` turns it off.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.autograd.function import once_differentiable

_PLAIN = (torch.Tensor, nn.Parameter)


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + scaling (x A^T) B^T`` with gradients for ``x``, ``A`` and ``B`` (W, b frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        # the output is allocated in its final shape and returned as is (not as a view of a 2-D result), so
        # a model may modify it in place (Llama-4 does)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        flat = out.view(-1, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, x2, weight.t(), out=flat)
        else:
            torch.mm(x2, weight.t(), out=flat)
        flat.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ lora_b
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight).addmm_(gb, lora_a, alpha=s).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            da = (gb.t() @ x2).mul_(s)
        if ctx.needs_input_grad[4]:
            db = (g.t() @ xa).mul_(s)
        return dx, None, None, da, db, None


def _plain_case(layer, x, args, kwargs):
    """``(weight, bias, A, B, scaling)`` when this call is the plain LoRA case, else ``None``."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and
                                                     (dropout.p == 0 or not dropout.training)):
        return None
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if type(base).forward is not nn.Linear.forward or type(lora_a).forward is not nn.Linear.forward \
            or type(lora_b).forward is not nn.Linear.forward or lora_a.bias is not None or lora_b.bias is not None:
        return None
    weight, bias = base.weight, base.bias
    tensors = (weight, lora_a.weight, lora_b.weight) + ((bias,) if bias is not None else ())
    if any(type(t) not in _PLAIN or t.dtype != x.dtype or t.device != x.device for t in tensors):
        return None
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    return weight, bias, lora_a.weight, lora_b.weight, float(layer.scaling[name])


def fused_forward(self, x, *args, **kwargs):
    """A peft ``lora.Linear`` forward: the fused path for the plain case, peft's own otherwise."""
    case = _plain_case(self, x, args, kwargs)
    if case is None:
        return type(self).forward(self, x, *args, **kwargs)
    return LoraLinearFunction.apply(x, *case)


def fuse_lora_layers(model) -> int:
    """Give every peft ``lora.Linear`` of ``model`` :func:`fused_forward`; returns how many.

    Layers of other classes (bitsandbytes, embeddings, convolutions) keep peft's forward. The config
    key ``fused_lora: false`` skips the call.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count


def unfuse_lora_layers(model) -> int:
    """Give the layers :func:`fuse_lora_layers` changed peft's own forward back; returns how many."""
    count = 0
    for module in model.modules():
        if vars(module).get("forward") is not None and getattr(module.forward, "__func__", None) is fused_forward:
            del module.forward
            count += 1
    return count
