"""FP8 training (``fp8``, ``fp8_backend``, ``fp8_enable_fsdp_float8_all_gather``: LLaMA-Factory main's keys) with
torchao's float8 linears, as LLaMA-Factory's torchao backend does: every linear layer but the embeddings and the
output head, with both dimensions divisible by 16, computes its matmuls in float8 (dynamic row-wise scaling; with
``fp8_enable_fsdp_float8_all_gather``, tensor-wise scaling whose FSDP2 all-gathers move float8). The weights stay in
their precision, so checkpoints and adapters are unchanged. CUDA needs compute capability 8.9 (Ada, Hopper) or
newer; the CPU runs the float8 matmuls through oneDNN (correct, and slow: a check, not a speed-up)."""

from __future__ import annotations

import logging

from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

#: LLaMA-Factory's module filter: names it never converts (numerical stability of the ends of the model)
SKIPPED_NAMES = ("embed", "lm_head", "output", "classifier")


def fp8_module_filter(module, name: str) -> bool:
    """LLaMA-Factory's rule: a 2-D weight, dimensions divisible by 16, not an embedding / head / output layer."""
    if any(skip in name.lower() for skip in SKIPPED_NAMES):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def check_fp8_device(device) -> None:
    """FP8 matmuls need a CUDA GPU of compute capability 8.9+ (or the CPU); refused naming the GPU otherwise."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise NotAvailableError(f"config key 'fp8': FP8 training needs an NVIDIA GPU of compute capability 8.9 "
                                    f"or newer (Ada, Hopper); {torch.cuda.get_device_name(device)} is "
                                    f"{major}.{minor}")
    elif device.type != "cpu":
        raise NotAvailableError(f"config key 'fp8': FP8 training on {device.type} is not implemented in lmf")


def convert_to_fp8(model, device, fsdp_float8_all_gather: bool = False) -> int:
    """Swap the eligible linears of ``model`` for torchao's Float8Linear (before DDP/FSDP wrapping); the count."""
    import importlib.util

    check_fp8_device(device)
    if importlib.util.find_spec("torchao") is None:
        raise NotAvailableError("config key 'fp8' needs the torchao package: pip install torchao (or lmf[fp8])")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its notes on CUDA extensions a CPU build cannot load
    pytree = logging.getLogger("torch.utils._pytree")  # torch's deprecation note on torchao's enum registrations
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    finally:
        pytree.setLevel(level)

    if fsdp_float8_all_gather:  # torchao all-gathers float8 with tensor-wise scales only
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    else:
        config = Float8LinearConfig.from_recipe_name("rowwise")
    before = sum(1 for _ in model.modules())
    try:
        convert_to_float8_training(model, config=config, module_filter_fn=fp8_module_filter)
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"config key 'fp8': torchao cannot convert this model: {exc}") from None
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    if converted == 0:
        raise ConfigError("config key 'fp8': no linear layer of this model qualifies for FP8 (dimensions divisible "
                          "by 16, not an embedding or output layer)")
    logger.info("fp8: %d of %d modules compute in float8 (torchao, %s scaling%s)%s", converted, before,
                "tensor-wise" if fsdp_float8_all_gather else "row-wise",
                ", float8 FSDP all-gathers" if fsdp_float8_all_gather else "",
                "; on the CPU float8 matmuls are emulated (slow)" if device.type == "cpu" else "")
    return converted
