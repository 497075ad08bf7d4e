"""YAML + ``key=value`` overrides -> validated :class:`LmfConfig`.

Rules:
- later sources win: YAML file, then overrides in command-line order;
- an unknown key is an error naming the key and the closest valid one;
- a bad value names the key, the value and the allowed values/type, or its range (``values.BOUNDS``);
- every message about one key names where the key came from: the YAML file or the command line;
- keys accepted for LLaMA-Factory compatibility but not implemented are an error when set
  to a non-default value (``UNSUPPORTED``) or a warning when harmless (``NO_EFFECT``); keys that only
  LLaMA-Factory has follow :mod:`lmf.config.compat` (its default accepted, anything else refused).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from lmf.config.args import (
    ARG_GROUPS,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
    TrainingArguments,
)
from lmf.config.rules import apply_cross_key_rules
from lmf.config.compat import (
    ALIASES,
    MEGATRON_KEYS,
    MEGATRON_REFUSAL,
    NO_EFFECT,
    UNSUPPORTED,
    UNSUPPORTED_FINETUNING_TYPES,
    check_lf_only_key,
    is_lf_only_key,
)
from lmf.config.deepspeed import DeepSpeedSettings
from lmf.config.stages import UNIMPLEMENTED_STAGES
from lmf.config.values import BOUNDS, check_value
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

@dataclass
class LmfConfig:
    """All argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: TrainingArguments
    generating: GeneratingArguments
    #: the ``deepspeed`` JSON as read and checked once by the config rules (not a key; None without one)
    deepspeed: Optional["DeepSpeedSettings"] = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every key (as a YAML file would hold it)."""
        out: dict[str, Any] = {}
        for group in (self.model, self.data, self.finetuning, self.training, self.generating):
            out.update(dataclasses.asdict(group))
        return out

    def config_hash(self) -> str:
        """Stable short hash of the full config (used for the distributed fingerprint and caches)."""
        payload = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def split_list(value: Any) -> list[str]:
    """A comma-separated config value (adapter paths, dataset names, tokens) as a list, blanks dropped."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _key_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for group_name, cls in ARG_GROUPS.items():
        for f in fields(cls):
            if f.name in index:
                raise RuntimeError(f"duplicate config key {f.name!r} in {group_name} and {index[f.name][0]}")
            index[f.name] = (group_name, f)
    return index


KEY_INDEX = _key_index()


def suggest_key(key: str) -> Optional[str]:
    """Closest valid key to ``key``, or None."""
    candidates = list(KEY_INDEX) + list(ALIASES)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value) with YAML typing of the value (``max_steps=10`` -> int).

    YAML 1.1 reads ``1e-4`` as a string; the typed coercion in :func:`build_config` turns it into the
    field's float, while string fields keep the text exactly as written.
    """
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"bad override {text!r}: expected key=value")
    return key, _yaml_scalar(raw)


def _yaml_scalar(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        return raw


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a dict; errors name the file."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def split_cli_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """Split ``[config.yaml] [key=value | --key value | --key=value ...]`` into (config path, overrides)."""
    config_path: Optional[str] = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{arg[2:]}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(f"{arg[2:]}=true")
        elif "=" in arg:
            overrides.append(arg)
        elif config_path is None and arg.lower().endswith((".yaml", ".yml", ".json")):
            config_path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected a config .yaml file or key=value")
        i += 1
    return config_path, overrides


def build_config(raw: dict[str, Any], *, source: Optional[str] = None, command_stage: Optional[str] = None,
                 sources: Optional[dict[str, str]] = None) -> LmfConfig:
    """Validate a flat dict of keys into an :class:`LmfConfig`; a LLaMA-Factory v1 config is translated first
    (:mod:`lmf.config.v1`; ``command_stage``: the stage the command runs, which v1 configs do not name).
    ``sources``: key -> where it was given (the YAML file or "command line"); ``source`` for the other keys."""
    from lmf.config.v1 import is_v1_config, translate_v1

    if is_v1_config(raw):
        raw = translate_v1(raw, source or "config", stage=command_stage)
    sources = dict(sources or {})
    values: dict[str, dict[str, Any]] = {g: {} for g in ARG_GROUPS}
    raw = _expand_lf_only_keys(raw, source, sources)
    for name, value in raw.items():
        key = ALIASES.get(name, name)
        where = sources.get(name, source)
        sources.setdefault(key, where)
        if key not in KEY_INDEX:
            if key in MEGATRON_KEYS:
                raise ConfigError(f"{where or 'config'}: config key {key!r} {MEGATRON_REFUSAL}")
            hint = suggest_key(key)
            msg = f"{where or 'config'}: unknown config key {key!r}"
            raise ConfigError(msg + (f"; did you mean {hint!r}?" if hint else "; see `lmf help config`"))
        group, f = KEY_INDEX[key]
        if value is None and f.default is None:
            values[group][key] = None
            continue
        try:
            coerced = check_value(key, value, f)
        except ConfigError as exc:
            raise ConfigError(_at(where, str(exc))) from None
        values[group][key] = coerced
    if values["training"].get("do_predict") and "do_train" not in values["training"]:
        values["training"]["do_train"] = False  # LF's prediction YAMLs leave do_train unset (its default: false)
    cfg = LmfConfig(
        model=ModelArguments(**values["model"]),
        data=DataArguments(**values["data"]),
        finetuning=FinetuningArguments(**values["finetuning"]),
        training=TrainingArguments(**values["training"]),
        generating=GeneratingArguments(**values["generating"]),
    )
    _check_unsupported(cfg, lambda key: sources.get(key, source))
    apply_cross_key_rules(cfg)
    return cfg


def _at(where: Optional[str], message: str) -> str:
    """``message`` prefixed with where its key was given (the YAML file or "command line"), when known."""
    return f"{where}: {message}" if where else message


def _expand_lf_only_keys(raw: dict[str, Any], source: Optional[str], sources: dict[str, str]) -> dict[str, Any]:
    """``raw`` without the keys only LLaMA-Factory has (checked by :func:`lmf.config.compat.check_lf_only_key`),
    plus the lmf keys some of them map to (an explicit lmf key wins over a mapped one; a mapped key's source, in
    ``sources``, is the LLaMA-Factory key's)."""
    out: dict[str, Any] = {}
    mapped: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source or 'config'}: config keys must be strings, got {key!r}")
        if ALIASES.get(key, key) in KEY_INDEX or not is_lf_only_key(key):
            out[key] = value
            continue
        where = sources.get(key, source)
        warning, extra = check_lf_only_key(key, value, where or "config")
        if warning:
            logger.warning("%s", _at(where, warning))
        for name, mapped_value in extra.items():
            if name not in raw:
                sources.setdefault(name, where)
            if isinstance(mapped_value, dict) and isinstance(mapped.get(name), dict):
                mapped[name] = {**mapped[name], **mapped_value}
            else:
                mapped[name] = mapped_value
    for name, value in mapped.items():
        if name in out and isinstance(out[name], dict) and isinstance(value, dict):
            out[name] = {**value, **out[name]}
        else:
            out.setdefault(name, value)
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _check_unsupported(cfg: LmfConfig, where: Any) -> None:
    """Keys accepted for compatibility but not implemented (``where(key)``: where the key was given)."""
    flat = cfg.to_dict()
    for key, reason in UNSUPPORTED.items():
        f = KEY_INDEX[key][1]
        if flat[key] != _default_of(f):
            raise ConfigError(_at(where(key), f"config key {key!r} is accepted for LLaMA-Factory compatibility but "
                                              f"{reason} in lmf"))
    for key, reason in NO_EFFECT.items():
        f = KEY_INDEX[key][1]
        if flat[key] != _default_of(f):
            logger.warning("%s", _at(where(key), f"config key {key!r} has no effect in lmf: {reason}"))
    ft = cfg.finetuning
    if ft.finetuning_type in UNSUPPORTED_FINETUNING_TYPES:
        raise ConfigError(_at(where("finetuning_type"), f"config key 'finetuning_type': {ft.finetuning_type!r} — "
                                                        f"{UNSUPPORTED_FINETUNING_TYPES[ft.finetuning_type]} in lmf"))
    if ft.stage in UNIMPLEMENTED_STAGES:
        raise ConfigError(_at(where("stage"), f"config key 'stage': {ft.stage!r} — {UNIMPLEMENTED_STAGES[ft.stage]} in lmf"))


def _raw_with_sources(argv: list[str]) -> tuple[dict[str, Any], Optional[str], dict[str, str]]:
    """``[config.yaml] [key=value ...]`` as a raw dict (not validated), the config path, and the keys given on the
    command line (key -> "command line")."""
    config_path, overrides = split_cli_args(argv)
    raw: dict[str, Any] = load_yaml(config_path) if config_path else {}
    sources: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        raw[key] = value
        sources[key] = "command line"
    return raw, config_path, sources


def raw_config(argv: list[str]) -> tuple[dict[str, Any], Optional[str]]:
    """``[config.yaml] [key=value ...]`` as a raw dict (not validated) and the config path."""
    raw, config_path, _ = _raw_with_sources(argv)
    return raw, config_path


def get_config(argv: list[str], *, require_model: bool = True, command_stage: Optional[str] = None) -> LmfConfig:
    """Parse ``[config.yaml] [key=value ...]`` into a validated config."""
    raw, config_path, sources = _raw_with_sources(argv)
    cfg = build_config(raw, source=config_path or "command line", command_stage=command_stage, sources=sources)
    if require_model and not cfg.model.model_name_or_path:
        raise ConfigError("config key 'model_name_or_path' is required")
    return cfg


def describe_keys() -> str:
    """A plain-text reference of every key, grouped (for `lmf help config`)."""
    lines: list[str] = []
    for group_name, cls in ARG_GROUPS.items():
        lines.append(f"[{group_name}]")
        for f in fields(cls):
            default = _default_of(f)
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(str(c) for c in choices if c is not None)})" if choices else ""
            tag = " [not implemented]" if f.name in UNSUPPORTED else (" [no effect]" if f.name in NO_EFFECT else "")
            extra += f" (range: {BOUNDS[f.name]})" if f.name in BOUNDS else ""
            lines.append(f"  {f.name} = {default!r}{tag}\n      {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
