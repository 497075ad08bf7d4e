"""Read raw records (dicts) from local json, jsonl, csv, parquet and plain-text files.

Records are yielded one at a time with their index in the file, so errors can name
``file + record index``. JSON-lines, csv and parquet are streamed; a ``.json`` array is parsed whole.
Plain text: one record ``{"text": line}`` per non-blank line.

Files must be UTF-8: a byte sequence that is not is a DataError naming the file, the byte offset and the line (in
JSON-lines and text files, only that line's record is malformed: ``skip_bad_records`` skips it like any other).
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


def _not_utf8(path: str, data: bytes, exc: UnicodeDecodeError) -> DataError:
    """The error for ``data`` (all of ``path``) that failed to decode as UTF-8 with ``exc``."""
    line = data.count(b"\n", 0, exc.start) + 1
    return DataError(f"{path} is not valid UTF-8: {exc.reason} at byte offset {exc.start} (line {line}); "
                     "save it as UTF-8")


def read_utf8(path: str) -> str:
    """The text of ``path``; a DataError naming the file, byte offset and line when it is not UTF-8."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None


def _lines(path: str) -> Iterator[tuple[int, int, Any]]:
    """(line number, byte offset, the line's text without its end or the UnicodeDecodeError) for every line of
    ``path``; lines end at \\n, \\r\\n or \\r, as text mode reads them."""
    offset, lineno = 0, 0
    with open(path, "rb") as fh:
        for chunk in fh:
            for raw in chunk.splitlines(keepends=True):
                lineno += 1
                start, offset = offset, offset + len(raw)
                try:
                    text: Any = raw.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError as exc:
                    text = exc
                yield lineno, start, text


def _bad_utf8_line(lineno: int, start: int, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"line {lineno} is not valid UTF-8: {exc.reason} at byte offset {start + exc.start} of the file")


def _json_is_lines(path: str) -> bool:
    """A ``.json`` file may hold one array/object or JSON lines (as datasets' json loader accepts)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip()
    if head.startswith(b"["):
        return False
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").strip()
    try:
        json.loads(first)
        return True
    except json.JSONDecodeError:
        return False


def _iter_json_lines(path: str) -> Iterator[RawRecord]:
    index = 0
    for lineno, start, line in _lines(path):
        if isinstance(line, UnicodeDecodeError):
            yield index, _bad_utf8_line(lineno, start, line)
        elif not line.strip():
            continue
        else:
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
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        yield from enumerate(data)
    elif kind == "csv":
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                yield from enumerate(csv.DictReader(fh))
        except UnicodeDecodeError:
            read_utf8(path)  # raises the DataError naming the byte offset and line
            raise
    elif kind == "parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    else:  # text
        index = 0
        for lineno, start, text in _lines(path):
            if isinstance(text, UnicodeDecodeError):
                yield index, _bad_utf8_line(lineno, start, text)
            elif text.strip():
                yield index, {"text": text}
            else:
                continue
            index += 1


def peek_fields(path: str) -> Optional[set[str]]:
    """The field names of the first record of ``path``, read cheaply (a JSON array's first element from the file's
    first MiB, a csv header, a parquet schema); None when that cannot be told without reading more."""
    try:
        kind = file_kind(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            return set(pq.ParquetFile(path).schema_arrow.names)
        if kind == "csv":
            with open(path, encoding="utf-8", newline="") as fh:
                return set(next(csv.reader(fh), []))
        if kind == "json" and not _json_is_lines(path):
            with open(path, "rb") as fh:
                head = fh.read(1 << 20).decode("utf-8", errors="replace").lstrip()
            head = head[1:].lstrip() if head.startswith("[") else head
            record = json.JSONDecoder().raw_decode(head)[0]
        elif kind in ("json", "jsonl"):
            record = next((rec for _, rec in _iter_json_lines(path)), None)
        else:
            return None
    except (OSError, ValueError, DataError):
        return None
    return set(record) if isinstance(record, dict) else None


def first_record(path: str) -> Optional[dict]:
    """The first readable record of ``path`` (used to detect the layout of unregistered files)."""
    for _, rec in iter_records(path):
        if isinstance(rec, dict):
            return rec
        break
    return None
