"""The torch profiler over training steps (``enable_torch_profiler`` and the ``profiler_*`` keys of LLaMA-Factory
main): ``torch.profiler`` with its wait / warmup / active / repeat schedule counted in optimizer steps, CPU activity
(and CUDA's on a GPU), shapes, memory and stacks as asked; each rank writes its traces (Chrome trace JSON, which
TensorBoard's profiler plugin and Perfetto open) into ``<profiler_output_dir or output_dir/profiler>/rank_<N>/``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


class StepProfiler:
    """``start()`` before the first step, ``step()`` after each optimizer step, ``stop()`` at the end (also after a
    failure); a no-op unless ``enable_torch_profiler``."""

    def __init__(self, cfg: "LmfConfig", rank: int):
        t = cfg.training
        self.args, self.rank = t, rank
        self.enabled = bool(t.enable_torch_profiler)
        self.trace_dir = os.path.join(t.profiler_output_dir or os.path.join(t.output_dir, "profiler"), f"rank_{rank}")
        self._profiler: Optional[object] = None

    def start(self) -> None:
        if not self.enabled:
            return
        import torch

        t = self.args
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(self.trace_dir, exist_ok=True)
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=t.profiler_wait_steps, warmup=t.profiler_warmup_steps,
                                             active=t.profiler_active_steps, repeat=t.profiler_repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir),
            record_shapes=t.profiler_record_shapes, profile_memory=t.profiler_profile_memory,
            with_stack=t.profiler_with_stack)
        self._profiler.start()
        if self.rank == 0:
            logger.info("torch profiler: wait %d, warmup %d, active %d step(s), repeat %d; traces in %s",
                        t.profiler_wait_steps, t.profiler_warmup_steps, t.profiler_active_steps, t.profiler_repeat,
                        os.path.dirname(self.trace_dir))

    def step(self) -> None:
        if self._profiler is not None:
            self._profiler.step()

    def stop(self) -> None:
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.stop()
