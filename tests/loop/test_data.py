"""Resumable data order: a pure function of (seed, epoch), skipping without reading skipped samples."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from telepathy.data import ResumableBatchSampler, derive_seed, resumable_loader, sample_generator


class Counting(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads.append(index)
        noise = torch.rand(1, generator=sample_generator(0, 0, index))
        return torch.tensor([float(index)]) + noise


def test_order_is_a_function_of_seed_and_epoch():
    a = list(ResumableBatchSampler(50, 8, seed=3, epoch=1))
    assert a == list(ResumableBatchSampler(50, 8, seed=3, epoch=1))
    assert a != list(ResumableBatchSampler(50, 8, seed=3, epoch=2))
    assert a != list(ResumableBatchSampler(50, 8, seed=4, epoch=1))
    assert sorted(i for b in a for i in b) == list(range(50))


def test_start_batch_yields_the_suffix_of_the_same_epoch():
    full = list(ResumableBatchSampler(50, 8, seed=3, epoch=1))
    resumed = ResumableBatchSampler(50, 8, seed=3, epoch=1, start_batch=4)
    assert list(resumed) == full[4:] and len(resumed) == len(full) - 4


def test_drop_last_and_bounds():
    assert ResumableBatchSampler(50, 8, seed=0, drop_last=True).batches_per_epoch == 6
    assert ResumableBatchSampler(50, 8, seed=0).batches_per_epoch == 7
    assert list(ResumableBatchSampler(50, 8, seed=0, start_batch=7)) == []


def test_skipped_samples_are_never_read():
    data = Counting(40)
    loader = resumable_loader(data, 4, seed=1, epoch=0, start_batch=7)
    list(loader)
    expected = [i for b in list(ResumableBatchSampler(40, 4, seed=1))[7:] for i in b]
    assert data.reads == expected


def test_loader_does_not_touch_the_global_torch_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(resumable_loader(Counting(16), 4, seed=1, epoch=0))
    assert torch.equal(torch.get_rng_state(), before)


def test_workers_give_the_same_batches_as_no_workers():
    single = list(resumable_loader(Counting(32), 4, seed=2, epoch=0, start_batch=3))
    multi = list(resumable_loader(Counting(32), 4, seed=2, epoch=0, start_batch=3, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(single, multi)) and len(single) == len(multi) == 5


def test_derive_seed_is_stable_and_spread():
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(2**70, -5) < 2**63
