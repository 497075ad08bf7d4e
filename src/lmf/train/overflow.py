"""``debug: underflow_overflow``: stop at the first module whose output holds inf or nan.

transformers' :class:`~transformers.debug_utils.DebugUnderflowOverflow` hooks every module's forward, keeps the last
frames (each module's input / weight / output absolute minimum and maximum) and prints them when a value overflows;
lmf turns its abort into one :class:`NumericalOverflowError` line naming the module and the forward it happened in.
"""

from __future__ import annotations

from lmf.extras.errors import LmfError


class NumericalOverflowError(LmfError):
    """A module's output held inf or nan under ``debug: underflow_overflow``."""


def watch_overflow(model) -> object:
    """Hook ``model`` (the frames print to stdout when an overflow is found); returns the watcher."""
    from transformers.debug_utils import DebugUnderflowOverflow

    class _Watcher(DebugUnderflowOverflow):
        def forward_hook(self, module, input, output):  # noqa: A002 - transformers' signature
            try:
                return super().forward_hook(module, input, output)
            except ValueError as exc:
                if not self.detected_overflow:
                    raise
                name = self.module_names.get(module, type(module).__name__)
                raise NumericalOverflowError(
                    f"debug underflow_overflow: inf or nan in the output of module {name!r} in forward "
                    f"{self.batch_number + 1} of this process (the frames before it are printed above)") from exc

    return _Watcher(model)
