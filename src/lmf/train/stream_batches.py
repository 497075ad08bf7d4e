"""Micro-batches of a streamed training set (:class:`lmf.data.streaming.StreamedDataset`), with the interface of
:class:`lmf.train.batches.MicroBatchStream` that the trainer reads.

A stream has no length: the run is ``max_steps`` long, the epochs follow each other without a boundary the loop
waits on (a micro-batch may take the last rows of one epoch and the first of the next), and ``epoch`` counts the
passes this rank completed. The position of a rank is ``[epoch, rows taken in it]``; checkpoints keep every rank's
(:meth:`position` / :meth:`restore`). With ``dataloader_num_workers`` > 0 one thread reads, tokenizes and collates
up to ``prefetch_factor`` (default 2) micro-batches ahead of the loop (the tokenizer releases the GIL), and errors
in it reach the loop as they are.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Any, Callable, Iterator, Optional

from lmf.extras.errors import LmfError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

_END = object()


class StreamedBatchStream:
    """Endless micro-batches of ``batch_size`` rows of a rank's share of a streamed dataset."""

    batches_per_epoch = float("inf")  # unknown: the loop never waits for an epoch to end
    batches_left_in_epoch = sys.maxsize

    def __init__(self, source, collate_fn: Callable, batch_size: int, prefetch: int = 0):
        self.source, self.collate_fn, self.batch_size, self.prefetch = source, collate_fn, batch_size, prefetch
        self.epoch, self.rows_in_epoch, self.batch_in_epoch = 0, 0, 0
        self._it: Optional[Iterator] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    @property
    def epoch_float(self) -> float:
        return float(self.epoch)

    def position(self) -> list[int]:
        return [self.epoch, self.rows_in_epoch, self.batch_in_epoch]

    def restore(self, positions: list, rank: int, world_size: int) -> None:
        """Continue where a checkpoint's ranks stopped: this rank's position when the world size is the same;
        otherwise as many rows of the earliest epoch as the old ranks took between them, spread over the new ones
        (the rows differ from an uninterrupted run's, which the log says)."""
        self.close()
        if len(positions) == world_size:
            self.epoch, self.rows_in_epoch, self.batch_in_epoch = positions[rank]
            return
        epoch = min(p[0] for p in positions)
        rows = sum(p[1] for p in positions if p[0] == epoch)
        self.epoch, self.rows_in_epoch, self.batch_in_epoch = epoch, rows // world_size, 0
        logger.warning("resuming a streamed run of %d process(es) with %d: each rank's share of the stream differs "
                       "from an uninterrupted run's (%d rows of epoch %d skipped by each)", len(positions),
                       world_size, self.rows_in_epoch, epoch)

    def _batches(self) -> Iterator[tuple[Any, tuple[int, int, int]]]:
        """(collated micro-batch, position after it), forever."""
        epoch, rows, batch_in_epoch = self.epoch, self.rows_in_epoch, self.batch_in_epoch
        pending: list = []
        empty_epochs = 0
        while True:
            produced = False
            for row in self.source.rows(epoch, skip=rows):
                produced = True
                pending.append(row)
                rows += 1
                if len(pending) == self.batch_size:
                    batch_in_epoch += 1
                    yield self.collate_fn(pending), (epoch, rows, batch_in_epoch)
                    pending = []
            empty_epochs = 0 if produced or rows else empty_epochs + 1
            if empty_epochs >= 2:
                raise LmfError("the streamed training data yields no samples for this process (every record was "
                               "skipped, or there are fewer records than processes)")
            epoch, rows, batch_in_epoch = epoch + 1, 0, 0

    def _start(self) -> None:
        if self.prefetch <= 0:
            self._it = self._batches()
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = stop = threading.Event()

        def offer(item) -> bool:  # False once the stream is closed (nobody takes items any more)
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self._batches():
                    if not offer(item):
                        return
            except BaseException as exc:  # noqa: BLE001 - raised again in the training loop
                offer((_END, exc))

        self._thread = threading.Thread(target=produce, name="lmf-stream", daemon=True)
        self._thread.start()

        def take():
            while True:
                item = ready.get()
                if item[0] is _END:
                    raise item[1]
                yield item

        self._it = take()

    def __next__(self):
        if self._it is None:
            self._start()
        batch, (self.epoch, self.rows_in_epoch, self.batch_in_epoch) = next(self._it)
        return batch

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the prefetching thread (it finishes the micro-batch it is on)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread, self._it = None, None
