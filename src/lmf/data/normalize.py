"""Raw records -> normalized Arrow datasets: each registered dataset read record by record, converted to the
normalized shape (:mod:`lmf.data.converter`) and written a chunk at a time; malformed records raise a DataError naming
file + record index + field, or with ``skip_bad_records`` are skipped, counted and reported (never silently);
``num_samples`` / ``weight`` of a registry entry sample the result, seeded."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from lmf.config.stages import STAGES
from lmf.data.converter import convert_record
from lmf.data.layout import features as _features
from lmf.data.layout import layout_of
from lmf.data.readers import iter_records
from lmf.data.registry import DatasetAttr
from lmf.extras.errors import DataError

MAX_REPORTED_PROBLEMS = 5


@dataclass
class BadRecords:
    """Malformed records seen while converting (file, record index, problem)."""

    problems: list = field(default_factory=list)

    def add(self, path: str, index: int, problem: str) -> None:
        self.problems.append((path, index, problem))

    def describe(self, limit: int = MAX_REPORTED_PROBLEMS) -> str:
        lines = [f"{p}: record {i}: {msg}" for p, i, msg in self.problems[:limit]]
        more = len(self.problems) - limit
        return "; ".join(lines) + (f" (and {more} more)" if more > 0 else "")


def check_attr_for_stage(attr: DatasetAttr, stage: str) -> None:
    layout = layout_of(stage)
    if layout == "pairwise" and not attr.ranking:
        raise DataError(f"dataset {attr.name!r} is not preference data (needs 'ranking: true' with chosen/rejected "
                        f"columns in dataset_info.json) and cannot be used for stage {stage!r}")
    if layout == "feedback" and not attr.kto_tag:
        raise DataError(f"dataset {attr.name!r} has no kto_tag column (columns: {{\"kto_tag\": ...}} in "
                        "dataset_info.json: true for a desirable answer, false for an undesirable one) and cannot be "
                        "used for stage 'kto'")
    if layout != "pairwise" and attr.ranking:
        pairwise = " or ".join(name for name, spec in STAGES.items() if spec.layout == "pairwise")
        raise DataError(f"dataset {attr.name!r} is preference data (ranking: true); use it with stage {pairwise}, "
                        f"not {stage!r}")


ARROW_WRITE_ROWS = 2000


def write_arrow_dataset(rows, features, path: str):
    """Memory-mapped ``datasets.Dataset`` of the dict ``rows`` (an iterator), written straight to ``path``.

    Rows are converted a chunk at a time with ``pyarrow.RecordBatch.from_pylist`` against the features'
    schema: the same table ``Dataset.from_generator`` builds, without its per-row Python encoding pass.
    """
    import datasets
    import pyarrow as pa

    schema = features.arrow_schema
    os.makedirs(os.path.dirname(path), exist_ok=True)
    count = 0
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        chunk: list = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= ARROW_WRITE_ROWS:
                writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
                count += len(chunk)
                chunk = []
        if chunk:
            writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=schema))
            count += len(chunk)
    if not count:
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.Dataset.from_file(path)


def raw_records(attr: DatasetAttr, limit: Optional[int]) -> Iterator[tuple[str, int, Any]]:
    """(file, record index, record or the DataError of an unreadable one) of ``attr``'s files in order, ``limit`` at
    most (``max_samples``)."""
    seen = 0
    for path in attr.files:
        for index, record in iter_records(path):
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield path, index, record


def normalize_record(record: Any, attr: DatasetAttr, stage: str, data_args) -> tuple[Optional[dict], Optional[str]]:
    """(normalized record, None) or (None, the problem) of one raw record of :func:`raw_records`."""
    if isinstance(record, DataError):
        return None, str(record)
    return convert_record(record, attr, stage, data_args.media_dir or data_args.dataset_dir)


def convert_dataset(attr: DatasetAttr, stage: str, data_args, bad: BadRecords, work_dir: str, seed: int):
    """Normalized Arrow dataset of one registered dataset (records converted in this process)."""

    def generate():
        for path, index, record in raw_records(attr, data_args.max_samples if attr.num_samples is None else None):
            normalized, problem = normalize_record(record, attr, stage, data_args)
            if problem is not None:
                bad.add(path, index, problem)
                continue
            yield normalized

    before = len(bad.problems)
    ds = write_arrow_dataset(generate(), _features("normalized"),
                            os.path.join(work_dir, "raw", f"{uuid.uuid4().hex}.arrow"))
    if len(bad.problems) > before and not data_args.skip_bad_records:
        raise DataError(f"dataset {attr.name!r}: {len(bad.problems) - before} malformed record(s): "
                        f"{BadRecords(bad.problems[before:]).describe()}. Fix them or set skip_bad_records: true")
    if attr.num_samples is not None and len(ds):
        import numpy as np

        rng = np.random.default_rng(seed)
        indexes = rng.permutation(len(ds))[: attr.num_samples]
        if attr.num_samples > len(ds):
            indexes = np.concatenate([indexes, rng.choice(len(ds), attr.num_samples - len(ds))])
        ds = ds.select(indexes)
        if data_args.max_samples:
            ds = ds.select(range(min(data_args.max_samples, len(ds))))
    if attr.sample_weight is not None and len(ds):
        import numpy as np

        count = max(1, int(len(ds) * attr.sample_weight))
        ds = ds.select(np.random.default_rng(seed + 1).choice(len(ds), count, replace=True))
    return ds
