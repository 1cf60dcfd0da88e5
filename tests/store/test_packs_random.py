"""Random differential saves against the rules packs must keep (after an adversarial review's fuzzer): tensors that
change, stay or return to an earlier value, blobs in packs and in files of their own, compression, emergency
checkpoints, retention with keep_best and keep_every, writers restarted, and ENOSPC/EIO injected mid-write, at an
fsync or at a rename. After every operation each kept checkpoint verifies and loads exactly the tensors it was
given, and no temporary is left behind."""

from __future__ import annotations

import errno
import os
import random

import pytest
import torch

from telepathy.disk import durable
from telepathy.disk.retention import RetentionPolicy
from telepathy.store import blobs as blob_module
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.store.formats import load_part

SIZES = [16384, 32768 + 25, 131072]  # float32 elements: 64 KiB, 128 KiB + 100 B (a buffered tail), 512 KiB


class Faults:
    """OSErrors injected with probability ``p``: a write cut short, an fsync or a rename refused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rng: random.Random) -> None:
        self.p, self.rng = 0.0, rng
        write_all, fsync_together, replace = durable.write_all, durable.fsync_together, os.replace

        def cut_write(file, data):
            view = memoryview(data).cast("B")
            if self.rng.random() < self.p:
                write_all(file, view[: self.rng.randrange(len(view) + 1)])
                raise OSError(errno.ENOSPC, "injected mid-write")
            return write_all(file, view)

        monkeypatch.setattr(durable, "write_all", cut_write)
        monkeypatch.setattr(durable, "fsync_together", lambda *a, **k: self.maybe("fsync") or fsync_together(*a, **k))
        monkeypatch.setattr(os, "replace", lambda *a, **k: self.maybe("rename") or replace(*a, **k))

    def maybe(self, where: str) -> None:
        if self.rng.random() < self.p:
            raise OSError(self.rng.choice([errno.ENOSPC, errno.EIO]), f"injected at {where}")


def check_kept(store: CheckpointStore, saved: dict, where: str) -> None:
    store._deleter.drain()
    for path in store.dir.all_checkpoints():
        store.catalog.verify(path)
        got, want = load_part(path, "model"), saved.get(path)
        if want is not None:
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (where, path)
    blobs = store.dir.blobs
    assert not (list(blobs.rglob(".tmp-*")) if blobs.exists() else []), where


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_differential_saves_keep_every_kept_checkpoint_whole(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    monkeypatch.setattr(blob_module, "PACK_BELOW", 300 * 1024)  # the 512 KiB tensors get files of their own
    faults = Faults(monkeypatch, rng)
    policy = RetentionPolicy(keep_last=rng.choice([1, 2, 3]), keep_best=rng.random() < 0.5,
                             keep_every=rng.choice([None, 3]))  # fmt: skip
    compress = rng.random() < 0.3

    def open_store() -> CheckpointStore:
        store = CheckpointStore(tmp_path, policy, differential=True, compress=compress)
        store.prepare()
        return store

    store = open_store()
    pool = [torch.randn(rng.choice(SIZES), generator=generator) for _ in range(6)]
    model = {f"t{i}": pool[i].clone() for i in range(6)}
    saved, step = {}, 0
    for op in range(30):
        for key in model:
            roll = rng.random()
            if roll < 0.3:
                model[key] = torch.randn(rng.choice(SIZES), generator=generator)
            elif roll < 0.4:
                model[key] = rng.choice(pool).clone()  # back to an earlier value: a blob that may be dead
        pool.extend(v.clone() for v in model.values())
        emergency = rng.random() < 0.1
        step += not emergency
        snapshot = {k: v.clone() for k, v in model.items()}
        faults.p = rng.choice([0, 0, 0.02, 0.1])
        try:
            saved[store.save(step, {"model": snapshot}, {"metric": rng.random()}, emergency=emergency)] = snapshot
        except Exception as exc:  # only the injected faults may fail a save, and only as themselves
            assert "injected" in str(exc), exc
        faults.p = 0
        if rng.random() < 0.15:
            store.close()
            store = open_store()
        check_kept(store, saved, f"seed {seed}, operation {op}")
    store.close()
