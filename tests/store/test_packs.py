"""Packs: a save's small new blobs in one file, read back exactly, retired when mostly dead, and a manifest that
lies about a pack location refused without reading outside the pack."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from adversary import read_manifest_doc, reseal_raw
from harness import deep_equal

from telepathy.disk import packs
from telepathy.disk.manifest import read_manifest
from telepathy.disk.retention import RetentionPolicy
from telepathy.errors import CheckpointInvalid, CheckpointWriteError
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
    """Edit the manifest entry of the second blob in the pack, then seal the manifest again (its self-hash must
    match, or it is refused before any pack check runs)."""
    doc = read_manifest_doc(path)
    name = max(doc["blobs"], key=lambda n: doc["blobs"][n]["offset"])
    change(doc["blobs"][name])
    reseal_raw(path, doc)
    return name


LIES = {"negative offset": {"offset": -1}, "bool offset": {"offset": True}, "float offset": {"offset": 1.5},
        "text offset": {"offset": "0"}, "huge offset": {"offset": 2**60}, "path": {"pack": "../../../etc/passwd"},
        "no pack": {"pack": None}, "int pack": {"pack": 7}}  # fmt: skip


@pytest.mark.parametrize("lie", [*LIES, "offset without pack", "pack without offset"])
def test_a_malformed_pack_location_is_a_damaged_manifest(packed_run, lie):
    _, path = packed_run
    forge(path, lambda e: e.pop("pack") if lie == "offset without pack" else e.pop("offset") if lie == "pack "
          "without offset" else e.update(LIES[lie]))  # fmt: skip
    with pytest.raises(CheckpointInvalid) as caught:
        read_manifest(path)
    assert "malformed pack location" in caught.value.reason


HOW = ["past the end", "overlapping", "truncated pack", "symlinked pack", "fifo pack", "directory pack",
       "missing pack", "pack named after its blob", "huge size"]  # fmt: skip


@pytest.mark.parametrize("how", HOW)
def test_a_pack_that_does_not_hold_the_blob_is_refused_by_verify_and_load(packed_run, how):
    save_dir, path = packed_run
    entry = next(iter(read_manifest(path)["blobs"].values()))
    pack = save_dir / BLOBS / entry["pack"][:2] / f"{entry['pack']}.pack"
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
    elif how in ("fifo pack", "directory pack"):
        pack.unlink()
        os.mkfifo(pack) if how == "fifo pack" else pack.mkdir()
    elif how == "missing pack":
        forge(path, lambda e: e.update(pack="0" * 32))
    elif how == "pack named after its blob":
        name = forge(path, lambda e: None)
        forge(path, lambda e: e.update(pack=name))
    else:
        forge(path, lambda e: e.update(bytes=2**46))
    with pytest.raises(CheckpointInvalid) as caught:
        CheckpointStore(save_dir).catalog.verify(path)
    assert ".pack" in caught.value.file + caught.value.reason, caught.value
    with pytest.raises(CheckpointInvalid):
        load_part(path, "model")  # never blocks on the FIFO, never reads the link's target
    assert CheckpointStore(save_dir).newest_valid() is None
    shown = subprocess.run([sys.executable, "-m", "telepathy", "verify", str(save_dir)], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr[-2000:]


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


def test_a_pack_write_that_fails_on_a_full_disk_leaves_nothing_and_the_next_save_works(tmp_path, monkeypatch):
    """The disk fills while a pack is written: the buffered tail cannot be flushed at close either. The save fails
    cleanly (no temporary left, nothing remembered of the pack), and once there is room the next save commits."""
    real_create = packs.durable.create_file

    class FullDisk:
        def __init__(self, path):
            self.file, self.written = real_create(path), 0

        def write(self, data):
            if self.written >= 64 * KIB:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.file.write(data)

        def close(self):
            self.file.close()
            raise OSError(errno.ENOSPC, "No space left on device")  # the final flush of the buffered tail

    store = store_at(tmp_path)
    state = {"model": {"a": torch.randn(128, 128 + 1), "b": torch.randn(128, 128 + 1)}}  # tails that stay buffered
    with monkeypatch.context() as patch:
        patch.setattr(packs.durable, "create_file", FullDisk)
        with pytest.raises(CheckpointWriteError, match="ENOSPC"):
            store.save(1, state, {})
    assert not [p for p in (tmp_path / BLOBS).rglob("*") if p.is_file()] and not store.blobs.known
    path = store.save(2, state, {})
    store.close()
    assert deep_equal(load_part(path, "model"), state["model"]) == []
    assert CheckpointStore(tmp_path).newest_valid()[0].path == path


def test_an_emergency_checkpoint_does_not_keep_a_frozen_blob_being_written_again(tmp_path):
    """Retirement moves a frozen blob out of a mostly dead pack once, then every save reuses it: an older
    emergency checkpoint naming the blob where it was must not count as its newest reference."""
    generator = torch.Generator().manual_seed(0)
    frozen = torch.randn(128, 128, generator=generator)

    def state():
        return {"model": {"frozen": frozen, **{k: torch.randn(128, 128, generator=generator) for k in "gh"}}}

    store = store_at(tmp_path)
    store.save(1, state(), {})
    store.save(1, state(), {}, emergency=True)
    written = []
    for step in range(2, 8):
        before = store.blobs.bytes_written
        store.save(step, state(), {})
        written.append((store.blobs.bytes_written - before) // (64 * KIB))
    store.close()
    assert written.count(3) <= 3, written  # the frozen blob (with g and h) at most every other save, not every save
