"""The process a run trains in: process group and device (:func:`setup_runtime`), TF32, CPU threads, seeds, autocast
(the process group itself: :mod:`lmf.dist.runtime`)."""

from __future__ import annotations

import contextlib
import os
import random
from typing import TYPE_CHECKING, Optional

from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    import torch

    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo

logger = get_logger(__name__)


def setup_runtime(cfg: "LmfConfig") -> "DistInfo":
    """Create the process group (under torchrun) and pick the device: the single place for runtime hooks."""
    from lmf.dist.runtime import init_distributed

    t = cfg.training
    info = init_distributed(timeout_s=t.ddp_timeout, backend=t.ddp_backend, use_cpu=t.use_cpu)
    if t.save_on_each_node:  # every node writes its own output_dir (no shared filesystem)
        import dataclasses

        info = dataclasses.replace(info, writers_per_node=True)
    apply_tf32(t.tf32, info.device)
    if info.is_distributed:
        logger.info("distributed: world_size=%d backend=%s device=%s", info.world_size, info.backend, info.device)
        from lmf.dist.fingerprint import check_consistency

        check_consistency(cfg.config_hash())  # every rank fails fast if nodes differ in versions or config
    return info


def apply_tf32(tf32: Optional[bool], device) -> None:
    """``tf32``: allow (or forbid) TF32 matmuls and convolutions on CUDA; on CPU it has nothing to change."""
    if tf32 is None:
        return
    if device.type != "cuda":
        logger.info("tf32: %s has no effect on %s (TF32 is a CUDA matmul mode)", tf32, device.type)
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    logger.info("tf32: TF32 matmuls %s", "allowed" if tf32 else "disabled")


def pick_cpu_threads(model, device) -> None:
    """On CPU without OMP_NUM_THREADS, use about one thread per 256 hidden units (up to the core count).

    torch defaults to every core; for small models the threads mostly wait on each other (a
    hidden-64 model trains ~3x slower with 2 threads than with 1 on a 2-core machine).
    """
    import torch

    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None) or 0
    threads = max(1, min(torch.get_num_threads(), hidden // 256))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("CPU training with %d torch thread(s) for hidden size %d (set OMP_NUM_THREADS to override)",
                    threads, hidden)


def set_seed(seed: int, full_determinism: bool = False) -> None:
    """Seed python, numpy and torch (all devices). ``full_determinism`` (transformers' enable_full_determinism):
    also deterministic algorithms only (an op without one raises, naming itself), cuDNN without autotuning and
    cuBLAS with a fixed workspace, for bit-identical reruns at some cost in speed."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if full_determinism:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def compute_dtype(cfg: "LmfConfig", device) -> Optional["torch.dtype"]:
    """The autocast dtype: bf16/fp16 on CUDA; none on CPU and with pure_bf16 (the weights already are bf16)."""
    import torch

    if device.type != "cuda" or cfg.finetuning.pure_bf16:
        return None
    t = cfg.training
    return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else None


def autocast(dtype: Optional["torch.dtype"], device):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device) -> dict:
    """Tensors of ``batch`` (and of nested dicts: a vision batch's ``mm_inputs``) moved to ``device``."""
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else to_device(v, device) if isinstance(v, dict)
                else v) for k, v in batch.items()}


def release_cached_memory(device) -> None:
    """Hand the accelerator's cached free memory back to the driver (``torch_empty_cache_steps``); the CPU
    allocator keeps no such cache."""
    import torch

    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and hasattr(backend, "empty_cache"):
        backend.empty_cache()
