"""Entry point of the training commands (placeholder until the trainers land)."""

from __future__ import annotations

from lmf.config import get_config
from lmf.extras.errors import NotAvailableError


def run_exp(argv: list[str], command: str = "sft") -> None:
    """Parse the config and run the stage's trainer."""
    get_config(argv)
    raise NotAvailableError(f"`lmf {command}` is not yet available: the trainers have not landed")
