"""What a run is made of: the objective protocol, the resumable progress, the loop's hooks, the live objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:
    import torch


class Objective(Protocol):
    """What a stage's recipe (SFT, DPO, RM, KTO: :mod:`lmf.config.stages`) plugs into the loop.

    ``collator(list[dict]) -> batch`` and ``compute_loss(model, batch) -> (loss_sum, num_items, metrics)``
    where ``loss_sum`` is a *sum* over ``num_items`` (label tokens for SFT, pairs for DPO/RM).
    Optional hooks (looked up with ``getattr``):

    - ``save_extra(out_dir, state_dict) -> state_dict``: called on rank 0 before the model is saved
      (checkpoints and final output) with the full CPU state dict of the HF model (trainable
      params only for LoRA); writes stage files (e.g. a value head) and returns what to save as model.
    - ``load_extra(model, checkpoint_dir) -> set[str]``: on resume, loads those files into the
      unwrapped model and returns the parameter names it restored.
    """

    name: str
    collator: Callable[[list[dict]], dict]

    def compute_loss(self, model, batch: dict) -> tuple["torch.Tensor", "torch.Tensor", dict[str, float]]:
        ...


@dataclass
class TrainState:
    """Progress saved in trainer_state.json (and restored on resume)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    data_epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    micro_batch_size: int = 1
    log_history: list = field(default_factory=list)
    log_window: list = field(default_factory=list)  # step losses since the last log entry
    resume_fingerprint: str = ""
    trajectory: dict = field(default_factory=dict)  # the training keys (lmf.train.resume.TRAJECTORY_KEYS)
    best_metric: Optional[float] = None  # the best metric_for_best_model so far (early stopping, the best model)
    best_global_step: Optional[int] = None  # the step it was measured at
    best_model_checkpoint: Optional[str] = None  # the checkpoint saved at that step, when one was
    evals_without_improvement: int = 0
    objective_state: dict = field(default_factory=dict)  # the objective's persistent_state (BCO's baseline)
    stream_positions: Optional[list] = None  # streamed data: [epoch, rows, micro-batches] of each rank
    early_stopped: bool = False
    finished: bool = False


def _nothing(step: int) -> None:
    return None


@dataclass(frozen=True)
class TrainHooks:
    """Callbacks the loop calls at fixed points (tests inject faults here; the defaults do nothing):
    ``after_step(step)`` right after optimizer step ``step``, ``during_save(step)`` while checkpoint-``step``
    is half-written (model written, state not yet)."""

    after_step: Callable[[int], None] = _nothing
    during_save: Callable[[int], None] = _nothing


_installed = TrainHooks()


def install_hooks(hooks: TrainHooks) -> None:
    """Make ``hooks`` the callbacks of every run this process starts (:mod:`lmf.testing.faults` installs its
    fault injection so; nothing in lmf itself does)."""
    global _installed
    _installed = hooks


def installed_hooks() -> TrainHooks:
    """The callbacks a run of this process uses (the no-op defaults unless :func:`install_hooks` was called)."""
    return _installed


@dataclass
class Run:
    """The live objects of a run, built by :meth:`lmf.train.trainer.Trainer.setup`: the loss module (the model
    plus the stage's loss), its DDP/FSDP wrapper, optimizer, schedule, loss scaler, micro-batch stream, plan."""

    loss_module: Any
    wrapped: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    stream: Any
    plan: Any
    trainable: list

    @property
    def steps_in_backward(self) -> bool:
        """The optimizer steps each weight in a backward hook (layerwise GaLore/APOLLO)."""
        return bool(getattr(self.optimizer, "steps_in_backward", False))
