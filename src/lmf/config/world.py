"""The keys that depend on how many processes train, resolved in one place once that number is known (after the
process group is up: :func:`lmf.train.workflow.run_training`), so that parsing a config gives the same result in
every process, the launcher included."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.extras.errors import ConfigError

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig


def apply_world_size(cfg: "LmfConfig", world_size: int) -> None:
    """``global_batch_size`` -> ``gradient_accumulation_steps``; ``dp_size`` and ``auto_find_batch_size`` checked
    against ``world_size``."""
    t = cfg.training
    if t.auto_find_batch_size and world_size > 1:
        raise ConfigError(f"config key 'auto_find_batch_size' with {world_size} processes is not implemented in lmf: "
                          "an out-of-memory error on one rank would leave the others waiting in a collective; find "
                          "the micro-batch size in one process")
    if t.dp_size is not None and t.dp_size != world_size:
        raise ConfigError(f"config key 'dp_size': {t.dp_size} differs from the {world_size} process(es); lmf has no "
                          "model-parallel mesh")
    if t.global_batch_size is None:
        return
    per_step = world_size * t.per_device_train_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"config key 'global_batch_size': {t.global_batch_size} is not a multiple of {world_size} "
                          f"process(es) x per_device_train_batch_size {t.per_device_train_batch_size}")
    t.gradient_accumulation_steps = t.global_batch_size // per_step
