"""Activation (gradient) checkpointing per decoder layer, optionally offloading to CPU memory.

``apply_activation_checkpointing(model, offload_to_cpu=False, use_reentrant=False)`` turns on
transformers' per-layer checkpointing (each decoder layer keeps only its inputs; everything
inside it is recomputed in the backward pass). With ``offload_to_cpu`` the tensors that the
checkpoints keep — the layer inputs, ``layers x tokens x hidden`` values, which dominate at long
context — are moved to pinned CPU memory in the forward and brought back in the backward
(``torch.autograd.graph.save_on_cpu``). Offloading only acts on CUDA tensors; on CPU it is a
no-op (logged once).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


def offload_context(device_type: str):
    """``save_on_cpu(pin_memory=True)`` for CUDA tensors, a null context otherwise."""
    if device_type == "cuda":
        from torch.autograd.graph import save_on_cpu

        return save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def _first_tensor_device_type(args) -> str:
    import torch

    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def _offloading(checkpoint_func):
    """Wrap a layer-checkpoint function so that what it saves lives in CPU memory."""
    if getattr(checkpoint_func, "_lmf_offloading", False):
        return checkpoint_func

    @functools.wraps(checkpoint_func)
    def checkpoint_with_offload(function, *args, **kwargs):
        with offload_context(_first_tensor_device_type(args)):
            return checkpoint_func(function, *args, **kwargs)

    checkpoint_with_offload._lmf_offloading = True
    return checkpoint_with_offload


def _is_checkpointed_layer(module) -> bool:
    if getattr(module, "gradient_checkpointing", False) is not True:
        return False
    if not hasattr(module, "_gradient_checkpointing_func"):
        return False
    try:  # transformers >= 4.52: decoder layers derive from GradientCheckpointingLayer
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return True
    return isinstance(module, GradientCheckpointingLayer)


def apply_activation_checkpointing(model, offload_to_cpu: bool = False, use_reentrant: bool = False):
    """Checkpoint every decoder layer of a (possibly PEFT-wrapped) transformers causal LM.

    Returns the number of checkpointed layers. Raises ``NotAvailableError`` when the architecture
    does not support checkpointing. The model must be in ``train()`` mode for it to take effect.
    """
    import torch

    from lmf.extras.errors import NotAvailableError
    from lmf.model.forward import unwrap_causal_lm

    causal_lm = unwrap_causal_lm(model)
    if not getattr(causal_lm, "supports_gradient_checkpointing", False):
        raise NotAvailableError(
            f"{type(causal_lm).__name__} does not support activation checkpointing; "
            "set disable_gradient_checkpointing: true"
        )
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(causal_lm, "activation_checkpointing_enable"):  # transformers >= 5
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(causal_lm, "config", None) is not None:
        causal_lm.config.use_cache = False  # the KV cache is incompatible with recomputation

    layers = [m for m in causal_lm.modules() if m is not causal_lm and _is_checkpointed_layer(m)]
    if offload_to_cpu:
        for module in layers:
            module._gradient_checkpointing_func = _offloading(module._gradient_checkpointing_func)
        if not torch.cuda.is_available():
            logger.info("offload_activations: no CUDA device, activations already live in CPU memory (no-op)")
    logger.info(
        "activation checkpointing on %d modules (use_reentrant=%s, offload_to_cpu=%s)",
        len(layers), use_reentrant, offload_to_cpu,
    )
    return len(layers)


def reentrant_checkpointing(cfg: "LmfConfig", plan=None) -> bool:
    """``use_reentrant_gc``, except under FSDP sharding, which needs non-reentrant checkpointing (as in LLaMA-Factory)."""
    if not cfg.model.use_reentrant_gc:
        return False
    if plan is None:
        from lmf.dist.plan import plan_parallelism
        from lmf.dist.runtime import env_world_size

        plan = plan_parallelism(cfg, env_world_size(), announce=False)
    if plan.mode == "fsdp":
        logger.info("FSDP sharding: non-reentrant gradient checkpointing (use_reentrant_gc does not apply)")
        return False
    return True


def enable_gradient_checkpointing(model, use_reentrant: bool, offload: bool = False) -> None:
    """Per-layer activation checkpointing (above); inputs require grad so frozen embeddings work."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        logger.warning("%s does not support gradient checkpointing; training without it", type(model).__name__)
        return
    apply_activation_checkpointing(model, offload_to_cpu=offload, use_reentrant=use_reentrant)
    model.enable_input_require_grads()
