"""liger-kernel (CUDA, optional): ``enable_liger_kernel``, with ``liger_kernel_config``'s switches: its fused linear
cross-entropy for lmf's loss, and its module kernels (rope, swiglu, rms_norm, ...) patched into the model."""

from __future__ import annotations

from lmf.extras.constants import IGNORE_INDEX
from lmf.extras.logging import log_once


def liger_available() -> bool:
    """Whether liger-kernel can be imported."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def use_liger_for(hidden, use_liger: bool) -> bool:
    """Liger's fused kernel runs only when asked for, on CUDA tensors, with liger-kernel installed."""
    if not use_liger:
        return False
    if hidden.device.type != "cuda":
        log_once("lmf.loss", "liger-cpu", "enable_liger_kernel: liger-kernel runs on CUDA only; using the chunked loss")
        return False
    if not liger_available():
        log_once("lmf.loss", "liger-missing",
                 "enable_liger_kernel: liger-kernel is not installed (pip install 'lmf[liger]'); using the chunked loss",
                 warning=True)
        return False
    return True


def liger_causal_lm_loss(hidden, lm_head, labels, softcap, label_smoothing: float = 0.0):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from lmf.loss.chunked import linear_params, select_label_rows

    rows, targets, _, counts = select_label_rows(hidden, labels)
    if targets.numel() == 0:  # nothing to predict: the chunked path returns a connected zero
        from lmf.loss.chunked import chunked_causal_lm_loss

        return chunked_causal_lm_loss(hidden, lm_head, labels, 1024, softcap=softcap, label_smoothing=label_smoothing)
    weight, bias = linear_params(lm_head)
    kwargs = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if softcap:
        kwargs["softcap"] = softcap
    if label_smoothing:
        kwargs["label_smoothing"] = label_smoothing  # liger's fused loss smooths as torch's cross_entropy does
    out = LigerFusedLinearCrossEntropyLoss(**kwargs)(weight, rows, targets, bias)
    loss_sum = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return loss_sum.float(), counts.sum()


def apply_module_kernels(model, config, device) -> bool:
    """Patch liger's module kernels into ``model`` (on CUDA, liger-kernel installed), as transformers'
    ``use_liger_kernel`` does; the loss stays lmf's (its forward is never patched). Returns whether they were."""
    if device.type != "cuda":
        log_once("lmf.loss", "liger-modules-cpu", "enable_liger_kernel: liger's module kernels run on CUDA only; "
                 "the model keeps its own")
        return False
    if not liger_available():
        return False  # use_liger_for says so once, with the pip line
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from lmf.config.values import LIGER_MODULE_KERNELS
    from lmf.model.forward import unwrap_causal_lm

    switches = {k: bool(v) for k, v in (config or {}).items() if k in LIGER_MODULE_KERNELS}
    _apply_liger_kernel_to_instance(model=unwrap_causal_lm(model), fused_linear_cross_entropy=False,
                                    cross_entropy=False, **switches)
    log_once("lmf.loss", "liger-modules", f"enable_liger_kernel: liger's module kernels applied "
             f"({', '.join(f'{k}={v}' for k, v in switches.items()) or 'its defaults'})")
    return True
