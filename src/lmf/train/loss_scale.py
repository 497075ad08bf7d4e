"""fp16 loss scaling: torch's ``GradScaler``, with DeepSpeed's hysteresis and minimum scale when a DeepSpeed
config sets them (``fp16.initial_scale_power``, ``loss_scale_window``, ``hysteresis``, ``min_loss_scale``,
``consecutive_hysteresis``; DeepSpeed's defaults otherwise)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from lmf.config.deepspeed import LossScaleSettings


def create_grad_scaler(device_type: str, settings: Optional["LossScaleSettings"]):
    """torch's default ``GradScaler``, or DeepSpeed's dynamic loss scaling when ``settings`` is given."""
    import torch

    if settings is None:
        return torch.amp.GradScaler(device_type)

    class DeepSpeedGradScaler(torch.amp.GradScaler):
        """Halve the scale only after ``hysteresis`` overflows (reset when the scale grows, or after every clean
        step with ``consecutive_hysteresis``), never below ``min_scale``; double it after ``window`` clean steps."""

        def __init__(self):
            super().__init__(device_type, init_scale=2.0 ** settings.initial_scale_power, growth_factor=2.0,
                             backoff_factor=0.5, growth_interval=settings.window)
            self.budget = settings.hysteresis

        def update(self, new_scale=None):
            if new_scale is not None or not self.is_enabled():
                return super().update(new_scale)
            before = self.get_scale()
            super().update()
            after = self.get_scale()
            if after < before:  # this step overflowed (and was skipped)
                if self.budget > 1:
                    self.budget -= 1
                    super().update(before)
                elif after < settings.min_scale:
                    super().update(settings.min_scale)
            elif after > before or settings.consecutive_hysteresis:
                self.budget = settings.hysteresis

        def state_dict(self):
            return {**super().state_dict(), "hysteresis_budget": self.budget}

        def load_state_dict(self, state_dict):
            state_dict = dict(state_dict)
            self.budget = state_dict.pop("hysteresis_budget", settings.hysteresis)
            super().load_state_dict(state_dict)

    return DeepSpeedGradScaler()
