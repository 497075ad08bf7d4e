"""Read raw records (dicts) from local json, jsonl, csv, parquet and plain-text files.

Records are yielded one at a time with their index in the file, so errors can name
``file + record index``. JSON-lines, csv, parquet and ``.json`` arrays are streamed (an array one element at a time).
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


JSON_READ_BYTES = 1 << 20


def _iter_json_array(path: str) -> Iterator[Any]:
    """The elements of a JSON array file (a single top-level object is one record), parsed one element at a time
    from a sliding window of the file: memory is the largest record plus a read, not the whole array parsed."""
    import codecs

    decoder, text_decoder = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    consumed_bytes = consumed_lines = dropped_columns = 0  # read, and dropped from the window (error positions)
    buf, pos, eof = "", 0, False
    with open(path, "rb") as fh:
        def more(size: int = JSON_READ_BYTES) -> bool:  # append to the window; False at the end of the file
            nonlocal buf, eof, consumed_bytes
            data = fh.read(size)
            try:
                buf += text_decoder.decode(data, final=not data)
            except UnicodeDecodeError:  # its position is within this read: decode the file up to here to name it
                fh.seek(0)
                prefix = fh.read(consumed_bytes + len(data))
                try:
                    prefix.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(path, prefix, exc) from None
                raise
            consumed_bytes += len(data)
            eof = not data
            return bool(data)

        def fail(msg: str, at: int) -> DataError:
            line = consumed_lines + buf.count("\n", 0, at) + 1
            newline = buf.rfind("\n", 0, at)
            column = at - newline if newline >= 0 else dropped_columns + at + 1
            return DataError(f"{path} is not valid JSON (line {line}, column {column}): {msg}")

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof or not more():
                    return

        def value():  # the JSON value at pos, reading more of the file until it is complete
            nonlocal pos
            size = JSON_READ_BYTES
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as exc:
                    if eof:
                        raise fail(exc.msg, exc.pos) from None
                    more(size)
                    size *= 2  # a record longer than the window: fewer re-parses
                    continue
                if end == len(buf) and not eof and isinstance(item, (int, float)):
                    more()  # a number may go on in the next read
                    continue
                pos = end
                return item

        def drop_consumed() -> None:
            nonlocal buf, pos, consumed_lines, dropped_columns
            if pos > JSON_READ_BYTES:
                newline = buf.rfind("\n", 0, pos)
                consumed_lines += buf.count("\n", 0, pos)
                dropped_columns = pos - newline - 1 if newline >= 0 else dropped_columns + pos
                buf, pos = buf[pos:], 0

        skip_space()
        if buf.startswith("\ufeff", pos):
            pos += 1
            skip_space()
        if pos >= len(buf):
            raise fail("Expecting value", pos)
        if buf[pos] != "[":
            item = value()
            skip_space()
            if pos < len(buf):
                raise fail("Extra data", pos)
            if not isinstance(item, dict):
                raise DataError(f"{path}: expected a JSON array of records, got {type(item).__name__}")
            yield item
            return
        pos += 1
        skip_space()
        if buf.startswith("]", pos):
            pos += 1
        else:
            while True:
                skip_space()
                yield value()
                drop_consumed()
                skip_space()
                if buf.startswith(",", pos):
                    pos += 1
                elif buf.startswith("]", pos):
                    pos += 1
                    break
                else:
                    raise fail("Expecting ',' delimiter", pos)
        skip_space()
        if pos < len(buf):
            raise fail("Extra data", pos)


def iter_records(path: str) -> Iterator[RawRecord]:
    """(index, record) for every record of ``path``; unreadable records come as (index, DataError)."""
    kind = file_kind(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    if kind == "jsonl" or (kind == "json" and _json_is_lines(path)):
        yield from _iter_json_lines(path)
    elif kind == "json":
        yield from enumerate(_iter_json_array(path))
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
