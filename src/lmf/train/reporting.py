"""Rank-0 progress bar, the training log (what is logged and when; the trackers it reports to:
:mod:`lmf.train.trackers`) and the loss plot."""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Optional

from lmf.extras.logging import get_logger
from lmf.train.trackers import Reporter

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


class TrainingLog:
    """What a run logs and when: every ``logging_steps`` (and the first step with ``logging_first_step``, and the
    last; ``logging_strategy: epoch``: at each epoch's end and the last step; ``no``: never) an entry with the mean loss of the steps since the previous entry, lr, grad norm, tokens/s and the
    objective's metrics; evaluation results. Each entry goes to ``log_history`` (saved in trainer_state.json), the
    trackers (``report_to``) and the console, on rank 0. The window's step losses live in the train state, so a
    resumed run logs the same averages."""

    def __init__(self, cfg: "LmfConfig", state, is_main: bool):
        self.args, self.state, self.is_main = cfg.training, state, is_main
        self.reporter = Reporter(cfg, is_main)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def due(self, step: int, last: bool, epoch_ended: bool = False) -> bool:
        a = self.args
        if a.logging_strategy == "epoch":
            return epoch_ended or last or (a.logging_first_step and step == 1)
        return step % a.logging_steps == 0 or last or (a.logging_first_step and step == 1)

    def reports(self, step: int, last: bool, epoch_ended: bool = False) -> bool:
        """Whether an entry is written after ``step`` (what reports alongside the log follows it: profile_modules)."""
        return self.args.logging_strategy != "no" and self.due(step, last, epoch_ended)

    def after_step(self, record, last: bool, suffix: str = "") -> None:
        """Add a step (:class:`lmf.train.step.StepRecord`) to the window; write an entry when one is due."""
        st = self.state
        if self.args.logging_strategy == "no":
            return
        st.log_window.append(record.loss)
        self.window_tokens += record.tokens
        if not self.due(record.step, last, record.epoch_ended):
            return
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        self.write({"step": record.step, "epoch": st.epoch, "loss": round(sum(st.log_window) / len(st.log_window), 6),
                    "lr": record.lr, "grad_norm": round(record.grad_norm, 6),
                    "tokens_per_second": round(self.window_tokens / seconds, 1), **record.metrics}, suffix)
        st.log_window, self.window_tokens, self.window_start = [], 0, time.perf_counter()

    def write(self, entry: dict, suffix: str = "") -> None:
        """One entry (a step's or an evaluation's) into log_history, the trackers and the console."""
        self.state.log_history.append(entry)
        if self.is_main:
            self.reporter.log(entry, self.state.global_step)
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
            logger.info("%s%s", line, f" {suffix}" if suffix else "")

    def close(self) -> None:
        self.reporter.close()


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Rank-0 progress over optimizer steps.

    On a terminal: a tqdm bar with loss, lr and tokens/s (ETA from tqdm), log lines printed above it.
    Elsewhere (CI, ``nohup``, cluster logs: stderr is not a TTY) no bar and no carriage-return
    redraws: each log line of the trainer (every ``logging_steps``) carries :meth:`suffix`, the
    step count and the ETA, next to its loss, lr and tokens/s.
    """

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        import sys

        self.total, self.done, self.start_done = total, initial, initial
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar = None
        self._redirect = None
        stream = stream if stream is not None else sys.stderr
        self.interactive = enabled and bool(getattr(stream, "isatty", lambda: False)())
        if self.interactive:
            import logging

            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=stream)
            # log lines are printed above the bar instead of through it
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("lmf")], tqdm_class=tqdm)
            self._redirect.__enter__()

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)

    def eta_seconds(self) -> float:
        steps = self.done - self.start_done
        if steps <= 0:
            return float("nan")
        return (time.perf_counter() - self.started) / steps * max(self.total - self.done, 0)

    def suffix(self) -> str:
        """``progress=N/M eta=H:MM:SS`` for the log line (empty when the bar shows it, or when disabled)."""
        if self.interactive or not self.enabled:
            return ""
        eta = self.eta_seconds()
        return f"progress={self.done}/{self.total}" + (f" eta={_format_duration(eta)}" if math.isfinite(eta) else "")

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _smooth(values: list[float], weight: Optional[float] = None) -> list[float]:
    """Exponential moving average (as TensorBoard's smoothing).

    The default weight grows with the number of points (about 0.18 for 8 points, 0.89 for 100), so a
    short run's curve is not flattened into a lagging line.
    """
    if weight is None:
        weight = 1.8 * (1.0 / (1.0 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def matplotlib_available() -> bool:
    """Whether ``plot_loss`` can draw (matplotlib is the optional extra ``lmf[plot]``)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def warn_if_no_plot(cfg: "LmfConfig", is_main: bool) -> None:
    """Say at the start, not after hours of training, that ``plot_loss`` cannot draw."""
    if cfg.finetuning.plot_loss and is_main and not matplotlib_available():
        logger.warning("plot_loss: matplotlib is not installed (pip install 'lmf[plot]'): "
                       "training_loss.png will not be written")


def plot_loss(log_history: list[dict], output_dir: str, key: str = "loss") -> Optional[str]:
    """Write ``training_loss.png`` (raw and smoothed) from the log history; None when nothing to plot."""
    points = [(h["step"], h[key]) for h in log_history if key in h and isinstance(h[key], (int, float)) and math.isfinite(h[key])]
    if not points:
        logger.warning("plot_loss: no %r values logged; nothing to plot", key)
        return None
    if not matplotlib_available():
        logger.warning("plot_loss: matplotlib is not installed (pip install 'lmf[plot]'); %s not written",
                       "training_loss.png" if key == "loss" else f"training_{key}.png")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
    ax.plot(steps, _smooth(list(values)), color="#1f77b4", label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"training {key}")
    ax.legend()
    name = "training_loss.png" if key == "loss" else f"training_{key}.png"
    path = os.path.join(output_dir, name)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
