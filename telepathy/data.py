"""Resumable data order.

An epoch's order is a pure function of ``(seed, epoch)``, so a resumed run can jump to ``batch_idx`` by
arithmetic instead of iterating (and loading) the skipped samples. The DataLoader gets its own generator
seeded from ``(seed, epoch)``; it therefore never draws from the global torch RNG, whose state belongs to
the model (dropout etc.) and is restored from the checkpoint.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from telepathy.training_signals import ignore_signals_in_worker

_MASK64 = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (SplitMix64 mixing; independent of PYTHONHASHSEED)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK64


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields the batches of one epoch, starting at ``start_batch``.

    The permutation depends only on ``(seed, epoch)``; skipping is O(1) per batch skipped (a slice), no
    sample is read. ``len()`` is the number of batches still to come.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        start_batch: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"need num_samples > 0 and batch_size > 0, got {num_samples}, {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle = shuffle
        self.drop_last = drop_last
        total = self.batches_per_epoch
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch={start_batch} outside the epoch's {total} batches")
        self.start_batch = start_batch

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order()
        for batch in range(self.start_batch, self.batches_per_epoch):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def _seed_worker(worker_id: int, *, seed: int, epoch: int) -> None:
    ignore_signals_in_worker()
    worker_seed = derive_seed(seed, epoch, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % (1 << 32))
    torch.manual_seed(worker_seed)


def worker_init_fn(seed: int, epoch: int) -> functools.partial:
    """A picklable ``worker_init_fn``: ignore training signals, seed random/NumPy/torch from
    ``(seed, epoch, worker_id)``. Randomness inside ``__getitem__`` that must survive a mid-epoch resume
    exactly should be drawn from ``sample_generator(seed, epoch, index)`` instead, since the worker that
    serves a given batch changes when a run resumes mid-epoch."""
    return functools.partial(_seed_worker, seed=seed, epoch=epoch)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for per-sample randomness (augmentation) that is the same whichever worker runs it."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, index, 0x5A))


def resumable_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader over ``dataset`` for one epoch, starting at batch ``start_batch``."""
    sampler = ResumableBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size,
        seed=seed,
        epoch=epoch,
        start_batch=start_batch,
        shuffle=shuffle,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=worker_init_fn(seed, epoch) if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 0xD1)),
        **loader_kwargs,
    )
