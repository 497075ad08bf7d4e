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


class ResumableShardedSampler(Sampler[int]):
    """Indices of this rank for one epoch, optionally starting after ``skip`` of them."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if num_items <= 0:
            raise ValueError("the training dataset is empty")
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.num_samples = math.ceil(num_items / num_replicas)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def epoch_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.num_replicas
        while len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class MicroBatchStream:
    """Endless micro-batches across epochs; ``epoch`` and ``batch_in_epoch`` are the resumable position."""

    def __init__(self, dataset: Sequence[Any], collate_fn: Callable, batch_size: int, sampler: ResumableShardedSampler,
                 num_workers: int = 0, pin_memory: bool = False, epoch: int = 0, batch_in_epoch: int = 0):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.sampler, self.num_workers, self.pin_memory = sampler, num_workers, pin_memory
        self.batches_per_epoch = math.ceil(sampler.num_samples / batch_size)
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._it = None

    def _start_epoch(self) -> None:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.batch_size)
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=self.collate_fn,
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=False,
            generator=torch.Generator(),  # never draw from the global RNG: resumed runs stay bit-exact
        )
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
        self.batch_in_epoch += 1
        return batch

    def __iter__(self):
        return self

    @property
    def batches_left_in_epoch(self) -> int:
        """Micro-batches the next ``next()`` calls take before the current epoch ends."""
        left = self.batches_per_epoch - self.batch_in_epoch
        return left if left > 0 else self.batches_per_epoch

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.batch_in_epoch / self.batches_per_epoch


def build_stream(dataset, collator, training_args, finetuning_args, runtime) -> MicroBatchStream:
    """The run's :class:`MicroBatchStream`: sharded by rank, shuffled with ``data_seed`` unless
    ``disable_shuffling``, ``dataloader_num_workers`` capped at the available cores."""
    from lmf.extras.logging import get_logger

    sampler = ResumableShardedSampler(len(dataset), runtime.world_size, runtime.rank,
                                      shuffle=not finetuning_args.disable_shuffling, seed=training_args.data_seed)
    workers = training_args.dataloader_num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > cores:
        get_logger("lmf.train.trainer").info("dataloader_num_workers=%d capped at the %d available CPU cores",
                                             workers, cores)
        workers = cores
    return MicroBatchStream(dataset, collator, training_args.per_device_train_batch_size, sampler,
                            num_workers=workers, pin_memory=runtime.device.type == "cuda")
