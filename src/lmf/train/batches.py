"""Deterministic, rank-sharded, resumable stream of micro-batches.

Each epoch shuffles with ``data_seed + epoch`` and gives rank r every W-th index (the tail is padded
by wrapping, like ``DistributedSampler``). The position (epoch, micro-batches consumed) is saved
in checkpoints; resuming skips the consumed indices without loading them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from lmf.extras.errors import LmfError


def sharded_index_batches(num_items: int, world_size: int, rank: int, batch_size: int) -> tuple[list[list[int]], int]:
    """This rank's batches for one pass over all items (evaluation, reference scoring), and how many are real.

    The rank takes every ``world_size``-th item, no duplicates. Every rank runs the same number of forwards (FSDP gathers weights in each one): a rank with one
    batch fewer gets a filler batch at the end, whose result the caller drops. So each item is
    counted exactly once across ranks.
    """
    mine = list(range(rank, num_items, world_size))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    most = -(-len(range(0, num_items, world_size)) // batch_size)  # rank 0 has the most items
    num_real = len(batches)
    batches += [[0]] * (most - num_real)
    return batches, num_real


def length_grouped(order, lengths, batch: int):
    """transformers' LengthGroupedSampler order from the shuffled ``order``: mega-batches of ``m x batch`` samples
    (m = 50, or fewer so that there are 4 mega-batches) each sorted longest first, and the longest sample of all
    swapped to the front (an out-of-memory shows at the first step)."""
    import numpy as np

    mult = max(1, min(len(order) // (batch * 4), 50))
    size = mult * batch
    length = np.asarray(lengths)[order]
    grouped = np.lexsort((-length.astype(np.int64), np.arange(len(order)) // size))  # stable: ties keep the shuffle
    order, length = order[grouped], length[grouped]
    starts = np.arange(0, len(order), size)
    longest = starts[int(np.argmax(length[starts]))]
    order[[0, longest]] = order[[longest, 0]]
    return order


class ResumableShardedSampler(Sampler[int]):
    """Indices of this rank for one epoch, optionally starting after ``skip`` of them."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 lengths=None, group_batch: int = 1):
        if num_items <= 0:
            raise ValueError("the training dataset is empty")
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.lengths, self.group_batch = lengths, group_batch  # group_by_length: every sample's length
        self.num_samples = math.ceil(num_items / num_replicas)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def epoch_order(self):
        """This rank's indices of the current epoch, a numpy int64 array (8 bytes a sample, no Python int each)."""
        import numpy as np

        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).numpy()
            if self.lengths is not None:
                order = length_grouped(order, self.lengths, self.group_batch)
        else:
            order = np.arange(self.num_items, dtype=np.int64)
        total = self.num_samples * self.num_replicas
        if total != len(order):
            order = np.resize(order, total)  # the tail padded by wrapping around
        return order[self.rank::self.num_replicas]

    def epoch_indices(self) -> list[int]:
        return self.epoch_order().tolist()

    def __iter__(self) -> Iterator[int]:
        return map(int, self.epoch_order()[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class IndexBatches:
    """Micro-batches of sample indices held as numpy arrays (``order[starts[i]:ends[i]]`` is batch i): an epoch's
    plan over millions of samples without a Python list per batch; a DataLoader ``batch_sampler``."""

    def __init__(self, order, starts, ends):
        self.order, self.starts, self.ends = order, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return IndexBatches(self.order, self.starts[index], self.ends[index])
        return self.order[self.starts[index]:self.ends[index]].tolist()

    def __iter__(self):
        for start, end in zip(self.starts.tolist(), self.ends.tolist()):
            yield self.order[start:end].tolist()

    def padded_to(self, count: int) -> "IndexBatches":
        """``count`` batches: these, then the first ones again (every rank runs the same number of steps)."""
        import numpy as np

        picks = np.arange(count) % len(self)
        return IndexBatches(self.order, self.starts[picks], self.ends[picks])


def token_budget_cuts(lengths, budget: int, padded: bool):
    """End offsets of the micro-batches :func:`token_budget_batches` cuts ``lengths`` (in batch order) into."""
    import numpy as np

    from array import array

    from lmf.data.stats import python_ints

    lengths = np.asarray(lengths)
    ends = array("q")  # 8 bytes a micro-batch, not a Python int
    count = longest = total = 0
    for position, n in enumerate(python_ints(lengths)):
        if count:
            size = max(longest, n) * (count + 1) if padded else total + n
            if size > budget:
                ends.append(position)
                count = longest = total = 0
        count, longest, total = count + 1, max(longest, n), total + n
    if count:
        ends.append(len(lengths))
    return np.frombuffer(ends, dtype=np.int64) if len(ends) else np.zeros(0, dtype=np.int64)


def token_budget_batches(order: Sequence[int], lengths: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """``order`` cut greedily into micro-batches of at most ``budget`` tokens: padded tokens (the longest sample
    x the count; ``dynamic_batching``) or real ones (their sum; ``dynamic_padding_free``). A sample never
    crosses into the next micro-batch, and one longer than the budget goes alone."""
    import numpy as np

    order = np.asarray(list(order), dtype=np.int64)
    ends = token_budget_cuts(np.asarray(lengths, dtype=np.int64)[order], budget, padded)
    return list(IndexBatches(order, np.concatenate(([0], ends[:-1])).astype(np.int64), ends))


class TokenBudget:
    """Dynamic batching: every rank cuts its share of the epoch by :func:`token_budget_batches`; all ranks
    compute every rank's cut (no communication) and the ones with fewer micro-batches repeat their first ones,
    so every rank runs the same number of steps (as the sampler repeats indices). ``lengths``: a numpy array."""

    def __init__(self, lengths, budget: int, padded: bool):
        import numpy as np

        self.lengths, self.budget, self.padded = np.asarray(lengths), budget, padded

    def epoch_batches(self, sampler: ResumableShardedSampler) -> IndexBatches:
        import numpy as np

        cuts, mine = [], None
        for rank in range(sampler.num_replicas):
            shard = ResumableShardedSampler(sampler.num_items, sampler.num_replicas, rank, sampler.shuffle, sampler.seed)
            shard.set_epoch(sampler.epoch)
            order = shard.epoch_order()
            ends = token_budget_cuts(self.lengths[order], self.budget, self.padded)
            cuts.append(len(ends))
            if rank == sampler.rank:
                mine = IndexBatches(order, np.concatenate(([0], ends[:-1])).astype(np.int64), ends)
        return mine.padded_to(max(cuts))


class _WorkerError:
    """An :class:`LmfError` raised by the collator in a DataLoader worker, sent back as the batch: torch would re-raise
    it as "Caught DataError in DataLoader worker process 0" plus the worker's traceback; the stream raises it in the
    main process with its own one-line message and exit code."""

    def __init__(self, exc: LmfError):
        self.type, self.message, self.exit_code = type(exc), str(exc), exc.exit_code

    def reraise(self):
        try:
            exc = self.type(self.message)
        except TypeError:  # a subclass with another constructor: the message and the exit code are what the user sees
            exc = LmfError(self.message)
            exc.exit_code = self.exit_code
        raise exc


class _CarryErrors:
    """The collate_fn run in DataLoader workers: an :class:`LmfError` is returned as a :class:`_WorkerError`."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, samples):
        try:
            return self.collate_fn(samples)
        except LmfError as exc:
            return _WorkerError(exc)


class MicroBatchStream:
    """Endless micro-batches across epochs; ``epoch`` and ``batch_in_epoch`` are the resumable position.
    With a :class:`TokenBudget` the micro-batches hold as many samples as fit the budget. ``drop_last``: an epoch's
    last micro-batch of this process is left out when it is incomplete. ``persistent_workers`` keeps one DataLoader
    (and its worker processes) for every epoch; ``prefetch_factor``: micro-batches each worker prepares ahead."""

    def __init__(self, dataset: Sequence[Any], collate_fn: Callable, batch_size: int, sampler: ResumableShardedSampler,
                 num_workers: int = 0, pin_memory: bool = False, epoch: int = 0, batch_in_epoch: int = 0,
                 token_budget: "TokenBudget | None" = None, drop_last: bool = False,
                 persistent_workers: bool = False, prefetch_factor: "int | None" = None):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.sampler, self.num_workers, self.pin_memory = sampler, num_workers, pin_memory
        self.token_budget, self.drop_last = token_budget, drop_last
        self.persistent_workers, self.prefetch_factor = persistent_workers and num_workers > 0, prefetch_factor
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._epoch_of_batches, self._batches = None, None
        self._it, self._loader = None, None

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches of the current epoch (with a token budget, they depend on the epoch's order)."""
        if self.token_budget is None:
            if self.drop_last:
                return self.sampler.num_samples // self.batch_size
            return math.ceil(self.sampler.num_samples / self.batch_size)
        return len(self._budget_batches())

    def _budget_batches(self) -> IndexBatches:
        if self._epoch_of_batches != self.epoch:
            self.sampler.set_epoch(self.epoch)
            self._batches, self._epoch_of_batches = self.token_budget.epoch_batches(self.sampler), self.epoch
        return self._batches

    def _start_epoch(self) -> None:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        collate_fn = _CarryErrors(self.collate_fn) if self.num_workers > 0 else self.collate_fn
        common = dict(collate_fn=collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory,
                      generator=torch.Generator())  # never draw from the global RNG: resumed runs stay bit-exact
        if self.num_workers > 0:
            common.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        if self.token_budget is not None:
            loader = DataLoader(self.dataset, batch_sampler=self._budget_batches()[self.batch_in_epoch:], **common)
        else:
            self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.batch_size)
            if self._loader is None or not self.persistent_workers:  # a persistent one reads the sampler anew
                self._loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                                          drop_last=self.drop_last, **common)
            loader = self._loader
        self._it = iter(loader)

    def __next__(self):
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._it)
        if isinstance(batch, _WorkerError):
            batch.reraise()
        self.batch_in_epoch += 1
        return batch

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the DataLoader's worker processes now (not whenever the garbage collector finds the iterator)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it, self._loader = None, None

    @property
    def batches_left_in_epoch(self) -> int:
        """Micro-batches the next ``next()`` calls take before the current epoch ends."""
        left = self.batches_per_epoch - self.batch_in_epoch
        return left if left > 0 else self.batches_per_epoch

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.batch_in_epoch / self.batches_per_epoch


def build_stream(dataset, collator, training_args, finetuning_args, runtime, cutoff_len: int = 0) -> MicroBatchStream:
    """The run's :class:`MicroBatchStream`: sharded by rank, shuffled with ``data_seed`` unless
    ``disable_shuffling``, ``dataloader_num_workers`` capped at the available cores; a token budget of
    ``cutoff_len x per_device_train_batch_size`` with the dynamic ``batching_strategy``."""
    from lmf.extras.logging import get_logger

    if getattr(dataset, "streamed", False):  # streaming: read and tokenized while training (lmf.data.streaming)
        from lmf.train.stream_batches import StreamedBatchStream

        prefetch = (training_args.dataloader_prefetch_factor or 2) if training_args.dataloader_num_workers else 0
        if prefetch:
            get_logger(__name__).info("streaming: one thread prepares %d micro-batches ahead (dataloader_num_workers "
                                      "%d: a stream is read in order by one reader per process)", prefetch,
                                      training_args.dataloader_num_workers)
        return StreamedBatchStream(dataset.shard(runtime.rank, runtime.world_size), collator,
                                   training_args.per_device_train_batch_size, prefetch=prefetch)
    lengths = None
    if training_args.group_by_length:
        from lmf.data.stats import list_lengths

        columns = [c for c in ("input_ids", "chosen_input_ids", "rejected_input_ids") if c in dataset.column_names]
        lengths = sum(list_lengths(dataset, c) for c in columns)
    sampler = ResumableShardedSampler(len(dataset), runtime.world_size, runtime.rank,
                                      shuffle=not finetuning_args.disable_shuffling, seed=training_args.data_seed,
                                      lengths=lengths,
                                      group_batch=training_args.per_device_train_batch_size * runtime.world_size)
    workers = training_args.dataloader_num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > cores:
        get_logger(__name__).info("dataloader_num_workers=%d capped at the %d available CPU cores",
                                             workers, cores)
        workers = cores
    budget = None
    strategy = training_args.batching_strategy
    if strategy in ("dynamic_batching", "dynamic_padding_free"):
        from lmf.data.stats import list_lengths

        lengths = list_lengths(dataset)
        tokens = training_args.per_device_train_batch_size * cutoff_len
        budget = TokenBudget(lengths, tokens, padded=strategy == "dynamic_batching")
        get_logger(__name__).info("%s: micro-batches of up to %d %s tokens (cutoff_len x micro-batch size)",
                                             strategy, tokens, "padded" if budget.padded else "real")
    if training_args.dataloader_drop_last and sampler.num_samples < training_args.per_device_train_batch_size:
        from lmf.extras.errors import ConfigError

        raise ConfigError(f"config key 'dataloader_drop_last': each of the {runtime.world_size} process(es) gets "
                          f"{sampler.num_samples} training samples per epoch, fewer than per_device_train_batch_size "
                          f"{training_args.per_device_train_batch_size}: every micro-batch would be dropped")
    return MicroBatchStream(dataset, collator, training_args.per_device_train_batch_size, sampler,
                            num_workers=workers, pin_memory=runtime.device.type == "cuda", token_budget=budget,
                            drop_last=training_args.dataloader_drop_last,
                            persistent_workers=training_args.dataloader_persistent_workers,
                            prefetch_factor=training_args.dataloader_prefetch_factor)
