"""One config value on its own: coerced to its key's type, then checked against the key's ``choices`` and its
range (:data:`lmf.config.args.BOUNDS`). Errors name the key, the value and what is allowed; the parser
(:mod:`lmf.config.parser`) adds where the key was given.

This module must stay import-light (stdlib only): ``lmf help`` imports the parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Optional, Union

from lmf.config.args import BOUNDS
from lmf.extras.errors import ConfigError


def check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    """``value`` (not None) of config key ``key`` (field ``f``) coerced to its type; ConfigError when it is not of
    that type, not one of its choices or out of its range."""
    coerced = _coerce(key, value, f.type)
    _check_choices(key, coerced, f)
    _check_bounds(key, coerced)
    return coerced


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    if isinstance(tp, str):  # postponed annotations
        tp = eval(tp, {**vars(typing), **{"Optional": Optional, "Union": Union}})  # noqa: S307 - our own literals
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {allowed}")
    if value is None:
        raise ConfigError(f"config key {key!r}: a value is required (got null)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    if tp in (dict, list):
        if isinstance(value, str) and tp is dict:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, tp):
            return value
        raise ConfigError(f"config key {key!r}: expected a {tp.__name__}, got {value!r}")
    return value


def _check_choices(key: str, value: Any, f: dataclasses.Field) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"config key {key!r}: {value!r} is not allowed; choose one of: {shown}")


def _within(value: float, spec: str) -> bool:
    """Whether ``value`` is in the range ``spec`` of :data:`lmf.config.args.BOUNDS` (">= 1", "> 0", "[0, 1)")."""
    if not math.isfinite(value):
        return False
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        return (low <= value if spec[0] == "[" else low < value) and (value <= high if spec[-1] == "]" else value < high)
    op, bound = spec.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def _check_bounds(key: str, value: Any) -> None:
    spec = BOUNDS.get(key)
    if spec is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and not _within(value, spec):
        shown = f"in {spec}" if spec[0] in "[(" else spec
        raise ConfigError(f"config key {key!r}: {value!r} is out of range (must be {shown})")
