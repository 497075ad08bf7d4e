"""``auto_find_batch_size``: a micro-batch that runs out of memory is retried as smaller micro-batches.

transformers halves the batch and restarts training from its first step; lmf retries only the step that ran out of
memory, from the same sample, and keeps the samples of an optimizer step: the micro-batch becomes the largest divisor
of it that is at most half, the accumulation grows by the same factor, so the run trains what it was configured to
(the same samples per step, the same order), only in smaller pieces.
"""

from __future__ import annotations

from typing import Optional

from lmf.extras.logging import get_logger

logger = get_logger(__name__)

#: what the allocators say when memory runs out (torch.OutOfMemoryError is caught by type)
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def smaller_micro_batch(size: int) -> Optional[int]:
    """The largest divisor of ``size`` that is at most ``size / 2`` (None for 1: nothing smaller to try)."""
    return next((d for d in range(size // 2, 0, -1) if size % d == 0), None)


def can_retry_smaller(exc: BaseException, args) -> bool:
    """Whether ``exc`` ran out of memory and a smaller micro-batch than ``args``'s exists."""
    return is_out_of_memory(exc) and smaller_micro_batch(args.per_device_train_batch_size) is not None


def shrink_after_oom(args, batch_in_epoch: int, reason: str) -> int:
    """After an out-of-memory error (``reason``) in a step that started at micro-batch ``batch_in_epoch`` of its
    epoch: ``args`` set to the smaller micro-batch and the larger accumulation (logged), and the step's first
    micro-batch in the new size."""
    old = args.per_device_train_batch_size
    new = smaller_micro_batch(old)
    factor = old // new
    args.per_device_train_batch_size = new
    args.gradient_accumulation_steps *= factor
    logger.warning("auto_find_batch_size: out of memory with micro-batches of %d (%s); retrying the step with "
                   "micro-batches of %d x accumulation %d (the same samples per step)", old, reason, new,
                   args.gradient_accumulation_steps)
    return batch_in_epoch * factor
