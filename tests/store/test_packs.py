"""Packs: a save's small new blobs in one file, read back exactly, retired when mostly dead, and a manifest that
lies about a pack location refused without reading outside the pack."""

from __future__ import annotations

import json
import os

import pytest
import torch
from harness import deep_equal

from telepathy.disk.manifest import read_manifest
from telepathy.disk.retention import RetentionPolicy
from telepathy.errors import CheckpointInvalid
from telepathy.store import blobs as blob_module
from telepathy.store.blobs import BLOBS
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.store.formats import load_part

KIB = 1024


def store_at(path, keep_last=1):
    store = CheckpointStore(path, RetentionPolicy(keep_last=keep_last, keep_best=False), differential=True)
    store.prepare()
    store.catalog.delete = lambda p: __import__("shutil").rmtree(p)  # collect at once: what is left is live
    return store


def files_in_shards(path):
    return sorted(p.name for p in (path / BLOBS).glob("[0-9a-f][0-9a-f]/*") if p.is_file())


def test_a_dense_save_of_small_tensors_writes_one_pack_and_a_large_tensor_its_own_file(tmp_path, monkeypatch):
    monkeypatch.setattr(blob_module, "PACK_BELOW", 1024 * KIB)
    small = {f"layer{i}": torch.randn(128, 128 + i) for i in range(40)}  # 64-84 KiB each
    state = {"model": {**small, "embedding": torch.randn(512, 1024)}}  # 2 MiB: its own file
    store = store_at(tmp_path)
    path = store.save(1, state, {})
    store.close()
    entries = read_manifest(path)["blobs"]
    packed = [e for e in entries.values() if "pack" in e]
    assert len(packed) == 40 and len({e["pack"] for e in packed}) == 1
    assert sorted(e["offset"] for e in packed) == sorted({e["offset"] for e in packed})  # end to end, no overlap
    assert [n.split(".")[1] for n in files_in_shards(tmp_path)].count("pack") == 1
    assert len(files_in_shards(tmp_path)) == 2  # the pack and the embedding's file
    assert deep_equal(load_part(path, "model"), state["model"]) == []
    assert CheckpointStore(tmp_path).newest_valid()[0].path == path


def test_a_mostly_dead_pack_is_retired_and_its_live_blob_moves(tmp_path):
    """A frozen tensor saved with three that change: after the second save its pack serves a quarter of itself,
    so the third save writes the frozen tensor again, into its own pack, and the old packs die."""
    frozen = torch.randn(128, 128)
    store = store_at(tmp_path)
    states = []
    for step in (1, 2, 3):
        states.append({"model": {"frozen": frozen, **{f"w{i}": torch.randn(128, 128) for i in range(3)}}})
        path = store.save(step, states[-1], {})
        if step == 2:  # step 1's pack still holds the frozen tensor: kept, beside step 2's pack
            assert len(files_in_shards(tmp_path)) == 2
    store.close()
    entries = read_manifest(path)["blobs"]
    assert len({e["pack"] for e in entries.values()}) == 1  # the frozen tensor moved into step 3's pack
    assert len(files_in_shards(tmp_path)) == 1 and store.blobs.bytes_written == (4 + 3 + 4) * 64 * KIB
    assert deep_equal(load_part(path, "model"), states[-1]["model"]) == []


def test_packs_stay_within_twice_what_they_serve_while_tensors_change_at_random(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(128, 128, generator=generator) for i in range(12)}
    store = store_at(tmp_path, keep_last=2)
    for step in range(1, 16):
        for name in tensors:
            if torch.rand(1, generator=generator).item() < 0.3:
                tensors[name] = torch.randn(128, 128, generator=generator)
        path = store.save(step, {"model": dict(tensors)}, {})
        live = store.catalog.referenced_blobs()
        on_disk = sum((tmp_path / BLOBS / name[:2] / name).stat().st_size for name in files_in_shards(tmp_path))
        assert on_disk <= 2 * sum(e["bytes"] for e in live.values()) + 12 * 64 * KIB, step  # + one save's worth
        assert deep_equal(load_part(path, "model"), tensors) == []
    store.close()
    for ref in CheckpointStore(tmp_path).committed():
        CheckpointStore(tmp_path).catalog.verify(ref.path)


@pytest.fixture
def packed_run(tmp_path):
    store = store_at(tmp_path, keep_last=3)
    state = {"model": {"a": torch.randn(128, 128), "b": torch.randn(128, 128)}}
    path = store.save(1, state, {})
    store.close()
    return tmp_path, path


def forge(path, change):
    """Edit one packed blob's manifest entry (the second in the pack)."""
    doc = json.loads((path / "manifest.json").read_text())
    name = max(doc["blobs"], key=lambda n: doc["blobs"][n]["offset"])  # the one that is not first in its pack
    change(doc["blobs"][name])
    (path / "manifest.json").write_text(json.dumps(doc))
    return name


@pytest.mark.parametrize(
    "lie",
    [
        {"offset": -1},
        {"offset": True},
        {"offset": 1.5},
        {"offset": 2**60},
        {"pack": "../../../etc/passwd"},
        {"pack": None, "offset": 0},
        {"pack": 7},
    ],
)
def test_a_malformed_pack_location_is_a_damaged_manifest(packed_run, lie):
    _, path = packed_run
    forge(path, lambda entry: entry.update(lie))
    with pytest.raises(CheckpointInvalid, match="malformed"):
        read_manifest(path)


@pytest.mark.parametrize("how", ["past the end", "overlapping", "truncated pack", "symlinked pack", "fifo pack"])
def test_a_pack_that_does_not_hold_the_blob_is_refused_by_verify_and_load(packed_run, how):
    save_dir, path = packed_run
    entry = read_manifest(path)["blobs"]
    pack = save_dir / BLOBS / next(iter(entry.values()))["pack"][:2] / f"{next(iter(entry.values()))['pack']}.pack"
    if how == "past the end":
        forge(path, lambda e: e.update(offset=e["offset"] + 64 * KIB + 1))
    elif how == "overlapping":  # inside the pack, but not where the blob is
        forge(path, lambda e: e.update(offset=e["offset"] - 4))
    elif how == "truncated pack":
        os.truncate(pack, pack.stat().st_size - 1)
    elif how == "symlinked pack":
        real = pack.with_name("elsewhere")
        pack.rename(real)
        pack.symlink_to(real.name)
    else:
        pack.unlink()
        os.mkfifo(pack)
    with pytest.raises(CheckpointInvalid) as caught:
        CheckpointStore(save_dir).catalog.verify(path)
    assert "pack" in str(caught.value)
    with pytest.raises(CheckpointInvalid):
        load_part(path, "model")  # never blocks on the FIFO, never reads the link's target
    assert CheckpointStore(save_dir).newest_valid() is None


def test_blob_files_of_earlier_saves_stay_readable_and_are_collected_like_packs(tmp_path, monkeypatch):
    """Checkpoints written before packs (a file per blob) and packed ones side by side: a blob file still named
    by a kept checkpoint is kept and reused, one no longer named is collected."""
    frozen, changing = torch.randn(128, 128), torch.randn(128, 128)
    monkeypatch.setattr(blob_module, "PACK_BELOW", 0)  # the layout before packs: a file per blob
    store = store_at(tmp_path, keep_last=2)
    store.save(1, {"model": {"frozen": frozen, "changing": changing}}, {})
    assert sorted(n.split(".")[1] for n in files_in_shards(tmp_path)) == ["raw", "raw"]
    store.close()
    monkeypatch.undo()
    store = store_at(tmp_path, keep_last=2)  # a new writer, with packs
    for step in (2, 3):
        changing = torch.randn(128, 128)
        path = store.save(step, {"model": {"frozen": frozen, "changing": changing}}, {})
    store.close()
    entries = read_manifest(path)["blobs"]
    assert sorted("pack" in e for e in entries.values()) == [False, True]  # frozen: still its own file
    assert sorted(n.split(".")[1] for n in files_in_shards(tmp_path)) == ["pack", "pack", "raw"]  # step 1's collected
    assert deep_equal(load_part(path, "model"), {"frozen": frozen, "changing": changing}) == []
