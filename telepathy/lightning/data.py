"""The data order of a Lightning training run, made resumable in place (torch only, no Lightning import).

A plain Lightning resume restores the loop counters but not the data position: after a mid-epoch resume the
DataLoader starts the epoch over with a new permutation (a ``RandomSampler`` without a generator draws its
seed from the global torch RNG at the start of each epoch), and Lightning ends the epoch early. Here the
training DataLoader's batch sampler gets a :class:`ResumableSampler` instead of its sampler: the order of an
epoch becomes a function of ``(seed, epoch)`` only, and the epoch a run resumes in starts at the batch where
the last checkpoint stopped. The DataLoader also gets its own generator, reseeded each epoch, so creating its
iterator never draws from the global RNG (whose state belongs to the model: dropout and the like).

Orders that cannot be reproduced this way (a custom sampler or batch sampler, an ``IterableDataset``, anything
that is not a ``DataLoader``) are refused with :class:`~telepathy.errors.UsageError`, or only warned about with
``allow_inexact_data=True``; never a silent difference.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from telepathy.data import derive_seed
from telepathy.errors import UsageError
from telepathy.training_signals import ignore_signals_in_worker

log = logging.getLogger("telepathy")

# Samplers whose order is a function of (seed, epoch) once telepathy drives them: SequentialSampler has one order,
# RandomSampler gets a generator seeded from (seed, epoch), DistributedSampler (Lightning injects it under DDP)
# permutes from its own seed and set_epoch(). Exact types: a subclass may draw its order from anywhere.
REPRODUCIBLE_SAMPLERS = (SequentialSampler, RandomSampler, DistributedSampler)
_LOADER_SEED = 0xD1  # the same constant as telepathy.data.resumable_loader's generator


class ResumableSampler(Sampler[int]):
    """The indices of ``inner`` for one epoch, in an order that depends only on ``(seed, epoch)``; the first
    ``skip`` indices of epoch ``skip_epoch`` are left out once (a resume in the middle of that epoch).
    ``len()`` stays the full epoch's: Lightning counts the skipped batches as already done."""

    def __init__(self, inner: Sampler[int], *, seed: int, epoch: int = 0, skip: int = 0,
                 loader_generator: torch.Generator | None = None) -> None:  # fmt: skip
        if type(inner) not in REPRODUCIBLE_SAMPLERS:
            raise UsageError(f"ResumableSampler cannot reproduce the order of a {type(inner).__name__}")
        self.inner = inner
        self.seed = seed
        self.loader_generator = loader_generator
        self.skip, self.skip_epoch = skip, epoch
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (``_set_sampler_epoch``)."""
        self.epoch = epoch
        if isinstance(self.inner, DistributedSampler):
            self.inner.set_epoch(epoch)
        if self.loader_generator is not None:  # the iterator's base seed (worker seeds) also follows the epoch
            self.loader_generator.manual_seed(derive_seed(self.seed, epoch, _LOADER_SEED))

    def __iter__(self) -> Iterator[int]:
        if isinstance(self.inner, RandomSampler):  # read by RandomSampler.__iter__ when the iteration starts
            self.inner.generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        skip = self.skip if self.epoch == self.skip_epoch else 0
        self.skip = 0  # only the epoch the run resumed in is partial
        indices = iter(self.inner)
        for _ in itertools.islice(indices, skip):  # indices only: no sample is loaded
            pass
        yield from indices

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


def _quiet_worker(worker_id: int, *, then: Callable[[int], Any] | None) -> None:
    """A DataLoader worker ignores the training signals (SLURM signals every process of a job step; SIGUSR1's
    default action would kill the worker and with it the run), then runs the user's ``worker_init_fn``."""
    ignore_signals_in_worker()
    if then is not None:
        then(worker_id)


def _refuse(problem: str, allow_inexact: bool) -> None:
    message = (f"{problem}; telepathy cannot resume its data order exactly, so a resumed run would train on other "
               "batches than an uninterrupted one")  # fmt: skip
    if not allow_inexact:
        raise UsageError(f"{message}. Use a DataLoader with shuffle=True/False (or Lightning's "
                         "DistributedSampler) and no custom sampler, or pass allow_inexact_data=True to accept an "
                         "inexact resume")  # fmt: skip
    log.warning("%s (allowed by allow_inexact_data=True)", message)


def prepare_train_loader(loader: object, *, seed: int, epoch: int, start_batch: int, allow_inexact: bool = False,
                         default_worker_init: Callable[[int], Any] | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Make ``loader`` (a training DataLoader, changed in place) resume at batch ``start_batch`` of ``epoch``
    and keep ``(seed, epoch)`` orders from then on. Returns the facts a resume must find unchanged (batch size,
    samples, batches per epoch), or None for a loader whose order telepathy does not own."""
    if not isinstance(loader, DataLoader):
        _refuse(f"the training data is a {type(loader).__name__}, not a torch DataLoader", allow_inexact)
        return None
    if loader.num_workers > 0:
        loader.worker_init_fn = functools.partial(_quiet_worker, then=loader.worker_init_fn or default_worker_init)
    if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
        log.warning("the training DataLoader %s keeps its own position (state_dict/load_state_dict; Lightning "
                    "saves it in its checkpoint dict, which telepathy stores): telepathy leaves its order alone "
                    "and does not check that its resume is exact", type(loader).__name__)  # fmt: skip
        return None
    if isinstance(loader.dataset, IterableDataset):
        _refuse("the training dataset is an IterableDataset (its position is its own)", allow_inexact)
        return None
    batches = loader.batch_sampler
    if type(batches) is not BatchSampler:
        _refuse(f"the training DataLoader has a custom batch sampler ({type(batches).__name__})", allow_inexact)
        return None
    inner = batches.sampler.inner if isinstance(batches.sampler, ResumableSampler) else batches.sampler
    if type(inner) not in REPRODUCIBLE_SAMPLERS:
        _refuse(f"the training DataLoader's sampler is a {type(inner).__name__}", allow_inexact)
        return None
    if loader.num_workers > 0:
        log.warning("the training DataLoader has num_workers=%d: the data order and the main process's random "
                    "streams resume exactly, but random numbers drawn inside workers (a random augmentation in "
                    "__getitem__) do not: after a mid-epoch resume a batch is loaded by another worker. Draw "
                    "per-sample randomness from telepathy.data.sample_generator(seed, epoch, index) to keep it "
                    "exact", loader.num_workers)  # fmt: skip
    generator = torch.Generator()
    loader.generator = generator  # the iterator's base seed comes from here, not from the global RNG
    batches.sampler = ResumableSampler(inner, seed=seed, epoch=epoch, skip=start_batch * batches.batch_size,
                                       loader_generator=generator)  # fmt: skip
    return {"batch_size": batches.batch_size, "samples": len(inner), "drop_last": batches.drop_last,  # type: ignore[arg-type]
            "batches_per_epoch": len(batches), "sampler": type(inner).__name__}  # fmt: skip


def prepare_eval_loader(loader: object, seed: int) -> None:
    """Give a validation DataLoader its own generator: creating its iterator (before any validation hook runs) then
    never draws from the global RNG, so a validation that a resumed run skips (Lightning skips one that was due
    right after the saved step) leaves training's random streams as an uninterrupted run has them."""
    if isinstance(loader, DataLoader) and loader.generator is None:
        loader.generator = torch.Generator().manual_seed(derive_seed(seed, 0xE7A1))
