"""Reading switches from the environment."""

from __future__ import annotations

import os

_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = True) -> bool:
    """``name`` as an on/off switch: ``0``/``false``/``no``/``off`` (any case) turn it off, anything else on."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() not in _OFF
