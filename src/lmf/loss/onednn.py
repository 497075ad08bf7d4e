"""``x @ w.T`` for fp32 tensors on the CPU through oneDNN, the LM head's two big matmuls per chunk.

torch's fp32 CPU matmul calls the BLAS it was built with (MKL's sgemm); oneDNN, which every x86 torch build
carries, is much faster on the LM head's shapes on this project's machines: an AMD EPYC with AVX-512, one
thread, 384 rows x 256 wide x 151,936 vocabulary, measured 66 -> 102 GFLOP/s for the logits (``rows @ W.T``)
and 92 -> 168 GFLOP/s for their gradient (``grad @ W``). ``torch.ops.mkldnn._linear_pointwise`` (the op
torch's inductor emits for CPU linears) takes plain dense tensors, so nothing is converted or copied.

Used only where it applies (CPU, fp32, oneDNN built in and enabled) and after a one-time check against
``torch.matmul`` on small random tensors; the config key ``use_onednn_matmul: false`` turns it off
(:func:`set_enabled`, from :func:`lmf.loss.loss_kwargs`). Results equal torch.matmul's
up to fp32 summation order.
"""

from __future__ import annotations

from typing import Optional

import torch

_usable: Optional[bool] = None
_enabled = True


def set_enabled(enabled: bool) -> None:
    """``use_onednn_matmul``: whether :func:`matmul_nt` may use oneDNN in this process."""
    global _enabled
    _enabled = bool(enabled)


def _op():
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def onednn_usable() -> bool:
    """Whether :func:`matmul_nt` goes through oneDNN in this process (checked once)."""
    global _usable
    if _usable is None:
        _usable = False
        if torch.backends.mkldnn.is_available():
            try:
                gen = torch.Generator().manual_seed(0)
                x, w, g = (torch.randn(*shape, generator=gen) for shape in ((37, 48), (53, 48), (37, 53)))
                _usable = bool(torch.allclose(_op()(x, w, None, "none", [], ""), x @ w.t(), rtol=1e-4, atol=1e-4)
                               and torch.allclose(_op()(g, w.t(), None, "none", [], ""), g @ w, rtol=1e-4, atol=1e-4))
            except (RuntimeError, TypeError, AttributeError):  # op missing or refused in this build
                _usable = False
    return _usable


def matmul_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (``x [M, K]``, ``w [N, K]``, either may be a transposed view); oneDNN for fp32 on the CPU."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.dim() == 2
            and torch.backends.mkldnn.enabled and _enabled and onednn_usable()):
        return _op()(x, w, None, "none", [], "")
    return x @ w.t()
