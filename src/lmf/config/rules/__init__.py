"""Rules between config keys, run by :func:`lmf.config.parser.build_config` once every key is valid on its own (type,
choices, range: :mod:`lmf.config.values`): first the derived defaults, in one place (:mod:`.defaults`), then small
named checks grouped by topic (:mod:`.training`, :mod:`.data`, :mod:`.loading`, :mod:`.methods`,
:mod:`.preference`, :mod:`.prediction`). Each check is registered with the keys it reads (:func:`rule`), so the
rules of a key are found from the key (:func:`rules_of`). Errors name the keys. Rules that need more than the
config live where that is known: the number of processes in :mod:`lmf.config.world` and :mod:`lmf.dist.plan`, the
model's modules in :mod:`lmf.model.adapter`, the data in :mod:`lmf.data.loader`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig


class Rule(NamedTuple):
    check: Callable[["LmfConfig"], None]
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.check.__module__.rsplit('.', 1)[-1]}.{self.check.__name__}"


#: Every check, in the order it runs (module by module, as :func:`apply_cross_key_rules` imports them).
RULES: list[Rule] = []


def rule(*keys: str):
    """Register a check ``fn(cfg)`` that reads ``keys`` (raises ConfigError, or warns)."""
    def register(fn):
        RULES.append(Rule(fn, keys))
        return fn
    return register


def _load() -> None:
    # the order the checks run in: a method (QOFT, PiSSA ...) is refused before the keys it would misuse
    from lmf.config.rules import methods, preference, prediction, data, loading, training  # noqa: F401, I001


def apply_cross_key_rules(cfg: "LmfConfig") -> None:
    """Derived defaults, then every check."""
    from lmf.config.rules.defaults import apply_defaults

    _load()
    apply_defaults(cfg)
    for r in RULES:
        r.check(cfg)


def rules_of(key: str) -> list[str]:
    """The checks that read ``key`` (``module.function`` names)."""
    _load()
    return [r.name for r in RULES if key in r.keys]
