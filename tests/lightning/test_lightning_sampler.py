"""The resumable data order of telepathy.lightning (no Lightning needed): a training DataLoader changed in place
gives, from batch k of epoch e, exactly the batches an uninterrupted epoch e gives from k on, never draws from the
global RNG, and a sampler whose order telepathy cannot reproduce is refused."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from telepathy.errors import UsageError
from telepathy.lightning.data import ResumableSampler, prepare_eval_loader, prepare_train_loader

DATA = TensorDataset(torch.arange(50))  # 7 batches of 8 (the last one short)


def epoch_batches(loader: DataLoader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


def prepared(epoch: int, start: int, **loader_args) -> DataLoader:
    loader = DataLoader(DATA, batch_size=8, **loader_args)
    prepare_train_loader(loader, seed=7, epoch=epoch, start_batch=start)
    return loader


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_resumed_epoch_continues_the_uninterrupted_order(shuffle):
    full = epoch_batches(prepared(2, 0, shuffle=shuffle))
    assert sorted(sum(full, [])) == list(range(50))
    for start in (1, 3, 6, 7):
        assert epoch_batches(prepared(2, start, shuffle=shuffle)) == full[start:]
    resumed = prepared(2, 3, shuffle=shuffle)
    assert len(resumed) == 7  # Lightning counts the epoch's batches; the skipped ones as done
    epoch_batches(resumed)
    resumed.batch_sampler.sampler.set_epoch(3)  # the next epoch is whole again, as in an uninterrupted run
    assert epoch_batches(resumed) == epoch_batches(prepared(3, 0, shuffle=shuffle))


def test_the_order_depends_on_seed_and_epoch_only_and_iterating_draws_no_global_random_numbers():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, again, other = (epoch_batches(prepared(e, 0, shuffle=True)) for e in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), before)  # dropout's random stream is untouched by the data order
    assert first == again and first != other


def test_a_distributed_sampler_is_resumed_per_rank():
    def rank_loader(start: int) -> DataLoader:
        loader = DataLoader(DATA, batch_size=4, sampler=DistributedSampler(DATA, num_replicas=2, rank=1, seed=3))
        prepare_train_loader(loader, seed=0, epoch=1, start_batch=start)
        return loader

    full = epoch_batches(rank_loader(0))
    assert len(full) == 7 and epoch_batches(rank_loader(2)) == full[2:]


class Odd(torch.utils.data.Sampler):
    def __iter__(self):
        return iter(range(49, -1, -1))

    def __len__(self):
        return 50


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


@pytest.mark.parametrize(
    ("loader", "named"),
    [
        (DataLoader(DATA, batch_size=8, sampler=Odd()), "sampler is a Odd"),
        (DataLoader(Stream(), batch_size=2), "IterableDataset"),
        ([torch.zeros(2)], "not a torch DataLoader"),
    ],
)
def test_an_order_telepathy_cannot_resume_is_refused_or_with_permission_warned(loader, named, caplog):
    with pytest.raises(UsageError, match=named) as refused:
        prepare_train_loader(loader, seed=0, epoch=0, start_batch=3)
    assert "allow_inexact_data=True" in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        assert prepare_train_loader(loader, seed=0, epoch=0, start_batch=3, allow_inexact=True) is None
    assert named in caplog.text and "inexact" in caplog.text


def test_a_worker_loader_is_warned_about_and_its_workers_ignore_training_signals(caplog):
    loader = DataLoader(DATA, batch_size=8, shuffle=True, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        prepare_train_loader(loader, seed=7, epoch=0, start_batch=0)
    assert "num_workers=2" in caplog.text and "sample_generator" in caplog.text
    assert loader.worker_init_fn.func.__name__ == "_quiet_worker"
    assert epoch_batches(loader) == epoch_batches(prepared(0, 0, shuffle=True))  # same order with workers


def test_a_sampler_it_cannot_reproduce_is_not_wrapped_and_eval_loaders_get_their_own_generator():
    with pytest.raises(UsageError, match="Odd"):
        ResumableSampler(Odd(), seed=0)
    evaluation = DataLoader(DATA, batch_size=8)
    prepare_eval_loader(evaluation, seed=0)
    assert isinstance(evaluation.generator, torch.Generator)
