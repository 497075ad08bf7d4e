"""Random-number-generator state of a training process (Python, numpy, torch CPU and CUDA), as checkpoints keep it
per rank so that a resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import os
import random

from lmf.extras.logging import get_logger

logger = get_logger(__name__)


def rng_state_name(rank: int) -> str:
    return f"rng_state_{rank}.pth"


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states of this process."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(checkpoint_dir: str, rank: int) -> None:
    """Restore this rank's RNG state (a rank without its own file takes rank 0's, with a warning)."""
    import torch

    path = os.path.join(checkpoint_dir, rng_state_name(rank))
    if not os.path.isfile(path):
        fallback = os.path.join(checkpoint_dir, rng_state_name(0))
        if not os.path.isfile(fallback):
            logger.warning("%s has no RNG state; the resumed run will not be bit-exact", checkpoint_dir)
            return
        logger.warning("%s has no RNG state for rank %d (different world size?); using rank 0's", checkpoint_dir, rank)
        path = fallback
    restore_rng_state(torch.load(path, weights_only=False))
