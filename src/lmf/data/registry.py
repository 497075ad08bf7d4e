"""Dataset registry: ``dataset_info.json`` (LLaMA-Factory v0) and the v1 YAML registry -> :class:`DatasetAttr`.

A ``dataset`` value is a comma-separated list of names. Each name is looked up in
``<dataset_dir>/dataset_info.json``; a name that is not registered but is a path to a data file
(or a folder of data files) is used directly, its format detected from the first record. A
``dataset`` value ending in ``.yaml``/``.yml`` is a v1 registry: ``name: {path, source, converter,
split, size}``.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from lmf.config.parser import split_list
from lmf.data.readers import first_record, peek_fields, read_utf8
from lmf.extras.errors import DataError
from lmf.extras.logging import log_once

DATA_EXTENSIONS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
}
FORMATTINGS = ("alpaca", "sharegpt", "openai", "pair")
COLUMN_KEYS = (
    "prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected", "kto_tag",
    "images", "videos", "audios",
)
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
_KNOWN_KEYS = set(COLUMN_KEYS) | {
    "file_name", "formatting", "columns", "tags", "ranking", "split", "num_samples", "subset", "folder",
    "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "load_from",
}
#: The optional columns each formatting uses, by their usual field names; a record field of that name that the
#: entry's ``columns`` leave unmapped is not read (as in LLaMA-Factory), so :func:`warn_unmapped_fields` says so.
OPTIONAL_COLUMNS = {
    "alpaca": ("system", "history", "tools", "images", "videos", "audios"),
    "sharegpt": ("system", "tools", "images", "videos", "audios"),
    "openai": ("system", "tools", "images", "videos", "audios"),
    "pair": ("images", "videos", "audios"),
}


@dataclass
class DatasetAttr:
    """One registered dataset: where its files are and how to read their records."""

    name: str
    files: list[str] = field(default_factory=list)
    formatting: str = "alpaca"
    ranking: bool = False
    split: str = "train"
    num_samples: Optional[int] = None
    #: v1 ``weight``: after ``num_samples``, resample to ``int(count x weight)`` records (seeded)
    sample_weight: Optional[float] = None
    #: alpaca: what joins instruction and input ("\n" as in LLaMA-Factory v0; "" in v1's alpaca converter)
    query_join: str = "\n"
    # alpaca columns
    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    history: Optional[str] = None
    # sharegpt / openai columns
    messages: str = "conversations"
    # shared
    system: Optional[str] = None
    tools: Optional[str] = None
    images: Optional[str] = None
    videos: Optional[str] = None
    audios: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    kto_tag: Optional[str] = None
    # sharegpt tags
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"
    #: set when the format was detected from the data rather than registered
    detected: bool = False

    def __repr__(self) -> str:
        return f"DatasetAttr({self.name!r}, formatting={self.formatting!r}, ranking={self.ranking}, files={self.files})"


def _data_files(path: str, name: str) -> list[str]:
    """A file, or every data file (same extension) inside a folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in DATA_EXTENSIONS
        )
        if not files:
            raise DataError(f"dataset {name!r}: folder {path} holds no data files ({', '.join(DATA_EXTENSIONS)})")
        exts = {os.path.splitext(f)[1].lower() for f in files}
        if len({DATA_EXTENSIONS[e] for e in exts}) > 1:
            raise DataError(f"dataset {name!r}: folder {path} mixes file types {sorted(exts)}")
        return files
    raise DataError(f"dataset {name!r}: file not found: {path}")


def load_dataset_info(dataset_dir: str) -> dict[str, Any]:
    """Parsed ``dataset_info.json`` of ``dataset_dir`` ({} when the file is absent)."""
    path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(path):
        return {}
    try:
        info = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise DataError(f"{path} must hold an object of dataset name -> settings")
    return info


def attr_from_info(name: str, entry: dict[str, Any], dataset_dir: str, source: str) -> DatasetAttr:
    """Validate one ``dataset_info.json`` entry into a :class:`DatasetAttr`."""
    if not isinstance(entry, dict):
        raise DataError(f"{source}: dataset {name!r} must be an object")
    unknown = [k for k in entry if k not in _KNOWN_KEYS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], sorted(_KNOWN_KEYS), n=1)
        raise DataError(f"{source}: dataset {name!r} has unknown key {unknown[0]!r}"
                        + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if "file_name" not in entry:
        hub = entry.get("hf_hub_url") or entry.get("ms_hub_url") or entry.get("om_hub_url") or entry.get("script_url")
        if hub:
            raise DataError(f"dataset {name!r} is a hub dataset ({hub}); lmf reads local files only: download it "
                            f"and register it with 'file_name' in {source}")
        raise DataError(f"{source}: dataset {name!r} has no 'file_name'")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{source}: dataset {name!r}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    attr = DatasetAttr(name=name, formatting=formatting, ranking=bool(entry.get("ranking", False)),
                       split=entry.get("split", "train"), num_samples=entry.get("num_samples"))
    if formatting in ("openai", "pair"):
        _apply_openai_defaults(attr)
        attr.formatting = formatting
    if formatting == "pair":
        attr.ranking, attr.chosen, attr.rejected = True, "chosen", "rejected"
    columns = entry.get("columns", {}) or {}
    for key, value in columns.items():
        if key not in COLUMN_KEYS:
            raise DataError(f"{source}: dataset {name!r}: unknown column key {key!r} (valid: {', '.join(COLUMN_KEYS)})")
        setattr(attr, key, value)
    if formatting == "alpaca" and attr.ranking:
        attr.chosen = attr.chosen or "chosen"
        attr.rejected = attr.rejected or "rejected"
    tags = entry.get("tags", {}) or {}
    for key, value in tags.items():
        if key not in TAG_KEYS:
            raise DataError(f"{source}: dataset {name!r}: unknown tag key {key!r} (valid: {', '.join(TAG_KEYS)})")
        setattr(attr, key, value)
    attr.files = _data_files(os.path.join(dataset_dir, entry["file_name"]), name)
    warn_unmapped_fields(attr, columns, source)
    return attr


def warn_unmapped_fields(attr: DatasetAttr, columns: dict, source: str) -> None:
    """Warn once per dataset when its first record has fields its format could use (``system``, ``history``,
    ``tools``, ``images``...) that its ``columns`` do not map: they are dropped, as LLaMA-Factory drops them."""
    fields = peek_fields(attr.files[0])
    if not fields:
        return
    mapped = {getattr(attr, key) for key in COLUMN_KEYS}
    unmapped = [key for key in OPTIONAL_COLUMNS.get(attr.formatting, ())
                if getattr(attr, key) is None and key in fields and key not in mapped]
    if not unmapped:
        return
    suggestion = json.dumps({**columns, **{key: key for key in unmapped}})
    log_once(__name__, f"unmapped:{attr.name}:{attr.files[0]}",
             f"dataset {attr.name!r}: records have fields {', '.join(unmapped)} that its entry in {source} does not "
             f"map (they are not used); {'set' if columns else 'add'} \"columns\": {suggestion} to use them",
             warning=True)


def _apply_openai_defaults(attr: DatasetAttr) -> None:
    attr.formatting = "openai"
    attr.messages = "messages"
    attr.role_tag, attr.content_tag = "role", "content"
    attr.user_tag, attr.assistant_tag, attr.system_tag = "user", "assistant", "system"
    attr.observation_tag, attr.function_tag = "tool", "function"
    attr.tools = attr.tools or "tools"


def detect_attr(name: str, files: list[str], first_record: Optional[dict]) -> DatasetAttr:
    """Guess the layout of an unregistered data file from its first record."""
    attr = DatasetAttr(name=name, files=files, detected=True)
    rec = first_record or {}
    if isinstance(rec.get("chosen"), list) and isinstance(rec.get("rejected"), list) and "messages" not in rec \
            and "conversations" not in rec:
        _apply_openai_defaults(attr)
        attr.formatting, attr.ranking, attr.chosen, attr.rejected = "pair", True, "chosen", "rejected"
    elif isinstance(rec.get("chosen_messages"), list) and isinstance(rec.get("rejected_messages"), list):
        _apply_openai_defaults(attr)  # LLaMA-Factory v1's native preference rows
        attr.formatting, attr.ranking = "pair", True
        attr.chosen, attr.rejected = "chosen_messages", "rejected_messages"
    elif "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        msgs = rec.get(key) or []
        first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else {}
        if "role" in first:
            _apply_openai_defaults(attr)
            attr.messages = key
        else:
            attr.formatting, attr.messages = "sharegpt", key
            attr.tools = "tools" if "tools" in rec else None
        attr.system = "system" if "system" in rec else None
        if "chosen" in rec and "rejected" in rec:
            attr.ranking, attr.chosen, attr.rejected = True, "chosen", "rejected"
    elif "instruction" in rec:
        attr.history = "history" if "history" in rec else None
        attr.system = "system" if "system" in rec else None
        if "chosen" in rec and "rejected" in rec:
            attr.ranking, attr.chosen, attr.rejected = True, "chosen", "rejected"
    elif "text" in rec:
        attr.prompt = "text"
    elif "prompt" in rec and "chosen" in rec and "rejected" in rec:
        attr.prompt, attr.ranking, attr.chosen, attr.rejected = "prompt", True, "chosen", "rejected"
    elif "prompt" in rec:
        attr.prompt, attr.response = "prompt", ("response" if "response" in rec else "completion")
    else:
        raise DataError(f"dataset {name!r}: cannot detect the format of {files[0]} from its first record "
                        f"(keys: {sorted(rec)}); register it in dataset_info.json with 'formatting' and 'columns'")
    return attr


def _load_v1_registry(path: str) -> list[DatasetAttr]:
    """LLaMA-Factory v1 YAML registry: ``name: {path, source: local, converter: alpaca|sharegpt|pair, size, split}``.

    Without a converter the records are OpenAI ``messages`` (v1's native format). ``path`` is taken
    relative to the working directory, else to the YAML file's folder.
    """
    import yaml

    try:
        registry = yaml.safe_load(read_utf8(path)) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(registry, dict):
        raise DataError(f"{path} must map dataset names to settings")
    base = os.path.dirname(os.path.abspath(path))
    attrs = []
    for name, entry in registry.items():
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(f"{path}: dataset {name!r} needs a 'path'")
        source = entry.get("source", "hf_hub")
        if source != "local":
            raise DataError(f"{path}: dataset {name!r}: source {source!r} needs the network; lmf reads local files "
                            "only (set source: local and a local path)")
        data_path = str(entry["path"])
        if not os.path.exists(data_path) and not os.path.isabs(data_path):
            data_path = os.path.join(base, data_path)
        files = _data_files(data_path, name)
        converter = entry.get("converter")
        attr = DatasetAttr(name=name, files=files)
        if converter == "alpaca":
            attr.system, attr.query_join = "system", ""  # v1 concatenates instruction and input as they are
        elif converter == "sharegpt":
            attr.formatting, attr.tools, attr.system = "sharegpt", "tools", "system"
        elif converter == "pair":
            _apply_openai_defaults(attr)
            attr.formatting, attr.ranking, attr.chosen, attr.rejected = "pair", True, "chosen", "rejected"
        elif converter in (None, "openai"):
            _apply_openai_defaults(attr)
        else:
            raise DataError(f"{path}: dataset {name!r}: converter {converter!r} is not one of alpaca, sharegpt, pair")
        if entry.get("size") is not None:
            attr.num_samples = int(entry["size"])
        if entry.get("weight") is not None:
            if float(entry["weight"]) <= 0:
                raise DataError(f"{path}: dataset {name!r}: weight must be > 0, got {entry['weight']}")
            attr.sample_weight = float(entry["weight"])
        if entry.get("streaming"):
            raise DataError(f"{path}: dataset {name!r}: streaming one dataset of a registry is not implemented "
                            "(LLaMA-Factory v1 cannot batch a streamed dataset either); set streaming: false here "
                            "and streaming: true in the training config to stream the whole training split")
        unknown = sorted(set(entry) - {"path", "source", "converter", "size", "weight", "split", "streaming"})
        if unknown:
            raise DataError(f"{path}: dataset {name!r}: unknown field(s) {', '.join(unknown)} (v1 dataset fields: "
                            "path, source, converter, size, weight, split, streaming)")
        attr.split = entry.get("split", "train")
        attrs.append(attr)
    return attrs


def resolve_datasets(names: Optional[str], dataset_dir: str, key: str = "dataset") -> list[DatasetAttr]:
    """``dataset`` value -> list of :class:`DatasetAttr` (registry names, file paths or a v1 YAML registry)."""
    if not names:
        return []
    info: Optional[dict] = None
    attrs: list[DatasetAttr] = []
    for name in split_list(names):
        if name.lower().endswith((".yaml", ".yml")):
            path = name if os.path.isfile(name) else os.path.join(dataset_dir, name)
            if not os.path.isfile(path):
                raise DataError(f"config key {key!r}: dataset registry not found: {name}")
            attrs.extend(_load_v1_registry(path))
            continue
        if info is None:
            info = load_dataset_info(dataset_dir)
        if name in info:
            attrs.append(attr_from_info(name, info[name], dataset_dir, os.path.join(dataset_dir, "dataset_info.json")))
            continue
        for candidate in (name, os.path.join(dataset_dir, name)):
            if os.path.exists(candidate) and (os.path.isdir(candidate)
                                              or os.path.splitext(candidate)[1].lower() in DATA_EXTENSIONS):
                files = _data_files(candidate, name)
                attrs.append(detect_attr(name, files, first_record(files[0])))
                break
        else:
            if not info and not os.path.isdir(dataset_dir):
                raise DataError(f"config key 'dataset_dir': {dataset_dir!r} does not exist "
                                f"(looking for dataset {name!r})")
            hint = difflib.get_close_matches(name, list(info or {}), n=1)
            where = os.path.join(dataset_dir, "dataset_info.json")
            raise DataError(f"config key {key!r}: dataset {name!r} is not registered in {where} and is not a file"
                            + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return attrs
