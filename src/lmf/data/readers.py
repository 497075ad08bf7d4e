"""Read raw records (dicts) from local json, jsonl, csv, parquet and plain-text files.

Records are yielded one at a time with their index in the file, so errors can name
``file + record index``. JSON-lines, csv and parquet are streamed; a ``.json`` array is parsed whole.
Plain text: one record ``{"text": line}`` per non-blank line.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterator, Optional

from lmf.extras.errors import DataError

RawRecord = tuple[int, Any]  # (index in file, record or a DataError describing an unreadable line)


def file_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    kinds = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    if ext not in kinds:
        raise DataError(f"{path}: unsupported data file type {ext!r}; use one of {', '.join(kinds)}")
    return kinds[ext]


def _json_is_lines(path: str) -> bool:
    """A ``.json`` file may hold one array/object or JSON lines (as datasets' json loader accepts)."""
    with open(path, encoding="utf-8") as fh:
        head = fh.read(1 << 16).lstrip()
    if head.startswith("["):
        return False
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip()
    try:
        json.loads(first)
        return True
    except json.JSONDecodeError:
        return False


def _iter_json_lines(path: str) -> Iterator[RawRecord]:
    with open(path, encoding="utf-8") as fh:
        index = 0
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as exc:
                yield index, DataError(f"line {lineno} is not valid JSON: {exc.msg}")
            index += 1


def iter_records(path: str) -> Iterator[RawRecord]:
    """(index, record) for every record of ``path``; unreadable records come as (index, DataError)."""
    kind = file_kind(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    if kind == "jsonl" or (kind == "json" and _json_is_lines(path)):
        yield from _iter_json_lines(path)
    elif kind == "json":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        yield from enumerate(data)
    elif kind == "csv":
        with open(path, encoding="utf-8", newline="") as fh:
            yield from enumerate(csv.DictReader(fh))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    else:  # text
        with open(path, encoding="utf-8") as fh:
            index = 0
            for line in fh:
                text = line.rstrip("\n")
                if text.strip():
                    yield index, {"text": text}
                    index += 1


def first_record(path: str) -> Optional[dict]:
    """The first readable record of ``path`` (used to detect the layout of unregistered files)."""
    for _, rec in iter_records(path):
        if isinstance(rec, dict):
            return rec
        break
    return None
