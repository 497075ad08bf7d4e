"""Streamed training data (``streaming: true``): records read, converted and tokenized while training runs, for
corpora larger than the preprocessing cache's disk or patience.

The stream of one epoch, on one rank: the registered datasets' records in order (``max_samples`` per dataset, as the
cached path takes them) -> every ``world_size``-th record from this rank's offset (the ranks' shares are disjoint and
cover the data) -> converted (a malformed record is an error naming file, record index and field, or skipped and
counted with ``skip_bad_records``) -> tokenized ``preprocessing_batch_size`` records at a time by the stage's
processor (the same tokens as the cached path) -> shuffled through a buffer of ``buffer_size`` rows seeded by
``data_seed`` and the epoch (LLaMA-Factory's ``IterableDataset.shuffle(buffer_size)``; no shuffle with
``disable_shuffling``). The position of a rank is (epoch, rows taken); :meth:`StreamedDataset.rows` replays an
epoch from that position (records before it are read and tokenized again, not trained on), so a resumed run sees
exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Iterator

from lmf.data.media import MEDIA_COLUMNS
from lmf.extras.errors import DataError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)


class StreamedDataset:
    """The training split of ``attrs`` as an endless, rank-sharded, seeded row stream (no ``len``)."""

    streamed = True

    def __init__(self, attrs: list, stage: str, processor, data_args, seed: int, shuffle: bool,
                 rank: int = 0, world_size: int = 1):
        self.attrs, self.stage, self.processor, self.data_args = attrs, stage, processor, data_args
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.skipped_records = 0

    def shard(self, rank: int, world_size: int) -> "StreamedDataset":
        """This dataset as rank ``rank`` of ``world_size`` reads it."""
        return StreamedDataset(self.attrs, self.stage, self.processor, self.data_args, self.seed, self.shuffle,
                               rank, world_size)

    def _records(self) -> Iterator[dict]:
        """Normalized records of this rank's share, in file order."""
        from lmf.data.normalize import MAX_REPORTED_PROBLEMS, normalize_record, raw_records

        d = self.data_args
        position = 0  # over all datasets: the ranks' shares interleave record by record
        for attr in self.attrs:
            for path, index, record in raw_records(attr, d.max_samples):
                mine = position % self.world_size == self.rank
                position += 1
                if not mine:
                    continue
                normalized, problem = normalize_record(record, attr, self.stage, d)
                if normalized is not None and any(normalized["_" + kind] for kind in MEDIA_COLUMNS):
                    raise DataError(f"{path}: record {index} has images, videos or audio but the model takes text "
                                    "only (a streamed dataset is text: set streaming: false for multimodal data)")
                if problem is not None:
                    if not d.skip_bad_records:
                        raise DataError(f"{path}: record {index}: {problem}. Fix it or set skip_bad_records: true")
                    self.skipped_records += 1
                    if self.skipped_records <= MAX_REPORTED_PROBLEMS:
                        logger.warning("skipped malformed record (skip_bad_records: true): %s: record %d: %s",
                                       path, index, problem)
                    continue
                yield normalized

    def _tokenized(self) -> Iterator[dict]:
        """Training rows (the stage's columns, python lists) of this rank's share, in order."""
        batch: list[dict] = []
        size = self.data_args.preprocessing_batch_size
        for record in self._records():
            batch.append(record)
            if len(batch) >= size:
                yield from self._encode(batch)
                batch = []
        if batch:
            yield from self._encode(batch)

    def _encode(self, records: list[dict]) -> Iterator[dict]:
        columns = {key: [r[key] for r in records] for key in records[0]}
        out = self.processor(columns)
        rows = out.to_pylist() if hasattr(out, "to_pylist") else [dict(zip(out, values)) for values in zip(*out.values())]
        for row in rows:
            yield {k: v for k, v in row.items() if not k.startswith("_")}

    def rows(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """Rows of ``epoch`` (shuffled through the buffer unless ``shuffle`` is off), the first ``skip`` left out."""
        stream = self._tokenized()
        if self.shuffle:
            stream = shuffle_buffer(stream, self.data_args.buffer_size, (self.seed, epoch))
        for i, row in enumerate(stream):
            if i >= skip:
                yield row

    def first_row(self) -> Any:
        """The first row of this rank's share (what ``lmf data`` shows), or None when the share is empty."""
        return next(iter(self._tokenized()), None)


def shuffle_buffer(items: Iterator[Any], size: int, seed) -> Iterator[Any]:
    """``items`` shuffled through a buffer of ``size``: once it is full, each new item takes the place of a uniformly
    drawn one, which is yielded; at the end the rest comes out in a random order (``datasets``' buffer shuffle).
    Deterministic for a given seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]
