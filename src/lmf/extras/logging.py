"""Rank-aware logging: only global rank 0 logs at INFO unless LMF_LOG_ALL_RANKS=1."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def get_logger(name: str = "lmf") -> logging.Logger:
    """Return a logger under the ``lmf`` namespace; configures the root ``lmf`` handler once."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("lmf")
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank{_rank()}] " if "RANK" in os.environ else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        level = os.environ.get("LMF_LOG_LEVEL", "INFO").upper()
        if _rank() != 0 and os.environ.get("LMF_LOG_ALL_RANKS", "0") not in ("1", "true"):
            level = "WARNING"
        root.setLevel(level)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("lmf") else f"lmf.{name}")


_ONCE: set = set()


def log_once(name: str, key: str, message: str, warning: bool = False) -> None:
    """Log ``message`` on logger ``name`` the first time this process sees ``key`` (INFO, or WARNING)."""
    if (name, key) in _ONCE:
        return
    _ONCE.add((name, key))
    logger = get_logger(name)
    (logger.warning if warning else logger.info)(message)


def is_truthy(value: str | None) -> bool:
    """Environment-variable truthiness: 1/true/yes/on (case-insensitive)."""
    return value is not None and value.strip().lower() in ("1", "true", "yes", "y", "on")
