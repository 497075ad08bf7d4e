"""Config loading for the serving commands (chat, export, api).

Besides ``CONFIG.yaml`` and ``key=value`` / ``--key value`` overrides, the serving commands take
short flags: ``--model PATH`` (model_name_or_path), ``--adapter PATH`` (adapter_name_or_path) and
``--backend NAME`` (infer_backend); ``--template NAME`` is already a config key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

FLAG_ALIASES = {
    "--model": "--model_name_or_path",
    "--adapter": "--adapter_name_or_path",
    "--backend": "--infer_backend",
}


def translate_flags(argv: list[str]) -> list[str]:
    """Rewrite the short flags (``--model X`` / ``--model=X``) into their config keys."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag in FLAG_ALIASES:
            out.append(FLAG_ALIASES[flag] + eq + value)
        else:
            out.append(arg)
    return out


def load_serving_config(argv: list[str]) -> "LmfConfig":
    """Parse a serving command's arguments into a validated config (model_name_or_path required)."""
    from lmf.config.parser import get_config

    return get_config(translate_flags(argv), require_model=True)
