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


class ModuleTimer:
    """``profile_modules`` (LLaMA-Factory main's ModuleProfilerCallback): the forward and backward time of the modules
    whose names match the comma-separated fnmatch patterns, logged (mean ms a call) when the training log writes an
    entry (:meth:`lmf.train.reporting.TrainingLog.reports`). CUDA events on a GPU; on the CPU, where kernels run
    synchronously, the wall clock (LLaMA-Factory times CUDA and NPU only)."""

    def __init__(self, model, patterns: str, is_main: bool):
        import fnmatch
        import time
        import warnings
        from collections import defaultdict

        import torch

        # a timed module whose inputs need no gradient (the first layer under LoRA) is still timed: torch's note on it
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self.patterns = [p.strip() for p in patterns.split(",") if p.strip()]
        self.is_main = is_main
        self.times: dict[tuple[str, str], list] = defaultdict(list)  # (module, fwd|bwd) -> [ms or event pairs]
        self._open: dict[tuple[str, str], object] = {}
        self._cuda = next((p.is_cuda for p in model.parameters()), False) and torch.cuda.is_available()
        self._clock = time.perf_counter
        self._handles = []
        modules = {n: m for n, m in model.named_modules() if n and any(fnmatch.fnmatch(n, p) for p in self.patterns)}
        names = list(modules)
        for name, module in modules.items():
            self._handles += [module.register_forward_pre_hook(self._starter(name, "fwd")),
                              module.register_forward_hook(self._stopper(name, "fwd")),
                              module.register_full_backward_pre_hook(self._starter(name, "bwd")),
                              module.register_full_backward_hook(self._stopper(name, "bwd"))]
        if is_main:
            if names:
                logger.info("profile_modules: timing %d module(s): %s%s", len(names), ", ".join(names[:5]),
                            f" ... (+{len(names) - 5})" if len(names) > 5 else "")
            else:
                logger.warning("profile_modules: no module matches %s", self.patterns)

    def _starter(self, name: str, kind: str):
        def hook(module, *args):
            if self._cuda:
                import torch

                start = torch.cuda.Event(enable_timing=True)
                start.record()
                self._open[(name, kind)] = start
            else:
                self._open[(name, kind)] = self._clock()
        return hook

    def _stopper(self, name: str, kind: str):
        def hook(module, *args):
            start = self._open.pop((name, kind), None)
            if start is None:
                return
            if self._cuda:
                import torch

                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.times[(name, kind)].append((start, end))
            else:
                self.times[(name, kind)].append((self._clock() - start) * 1000.0)
        return hook

    def after_step(self, step: int, due: bool) -> Optional[dict[str, tuple[float, float]]]:
        """When the training log writes an entry (``due``): module -> (mean forward ms, mean backward ms) since the
        last report, logged on rank 0; None between reports."""
        if not self.times or not due:
            return None
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        means: dict[str, list[float]] = {}
        for (name, kind), values in self.times.items():
            ms = [s.elapsed_time(e) for s, e in values] if self._cuda else values
            means.setdefault(name, [0.0, 0.0])[kind == "bwd"] = sum(ms) / len(ms)
        self.times.clear()
        if self.is_main:
            logger.info("profile_modules at step %d (mean ms a call): %s", step,
                        "; ".join(f"{n}: fwd={f:.3f} bwd={b:.3f}" for n, (f, b) in sorted(means.items())))
        return {n: (f, b) for n, (f, b) in means.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
