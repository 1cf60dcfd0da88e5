"""Differential and compressed checkpoints: unchanged tensors are not written again, blobs are collected only
when no kept checkpoint references them, damage is detected, compression round-trips exactly."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import xxhash
from harness import damage_blob, deep_equal
from torch import nn

from telepathy.checkpointer import Checkpointer
from telepathy.disk.manifest import read_manifest, verify_directory
from telepathy.disk.retention import RetentionPolicy
from telepathy.errors import CheckpointInvalid
from telepathy.store.blobs import BLOBS, BlobStore
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.train_state import TrainState


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def frozen_and_trained():
    torch.manual_seed(0)
    frozen, trained = nn.Linear(512, 512), nn.Linear(256, 256)  # 1 MiB frozen, 256 KiB trained
    frozen.requires_grad_(False)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    return frozen, trained, optimizer


def train_step(trained, optimizer):
    trained(torch.randn(4, 256)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_unchanged_tensors_are_not_written_again(tmp_path):
    frozen, trained, optimizer = frozen_and_trained()
    ckpt = Checkpointer(tmp_path, parts={"frozen": frozen, "trained": trained}, optimizer=optimizer,
                        differential=True, retention=RetentionPolicy(keep_last=1, keep_best=False))  # fmt: skip
    train_step(trained, optimizer)
    ckpt.save(TrainState(global_step=1), "interval")
    blobs = ckpt.store.blobs
    first = blobs.bytes_written
    train_step(trained, optimizer)
    ckpt.save(TrainState(global_step=2), "interval")
    second = blobs.bytes_written - first
    changed = tensor_bytes([trained.weight]) + 2 * tensor_bytes([trained.weight])  # weight + AdamW exp_avg(_sq)
    assert first > tensor_bytes(frozen.parameters()) and second <= 1.05 * changed, (first, second, changed)
    # keep_last=1: the old checkpoint is pruned and its blobs collected (renamed aside at once, deleted in the
    # background, gone when the writer closes), but the shared frozen blob stays.
    (kept,) = ckpt.store.committed()
    save_dir = ckpt.store.dir
    referenced = {save_dir.blob_file(n, e).name for n, e in read_manifest(kept.path)["blobs"].items()}
    in_shards = {p.name for p in (tmp_path / BLOBS).glob("[0-9a-f][0-9a-f]/*") if p.is_file()}
    assert in_shards == referenced and len(referenced) == 2  # the frozen blobs' pack (step 1), step 2's pack
    ckpt.close()
    on_disk = {p.name for p in (tmp_path / BLOBS).rglob("*") if p.is_file()}
    assert on_disk == referenced and not list((tmp_path / BLOBS).glob(".trash-*"))
    # Resume: exactly the saved tensors.
    frozen2, trained2, optimizer2 = frozen_and_trained()
    trained2.weight.data.zero_()
    resumed = Checkpointer(tmp_path, parts={"frozen": frozen2, "trained": trained2}, optimizer=optimizer2,
                           differential=True)  # fmt: skip
    resumed.resume()
    assert deep_equal(trained2.state_dict(), trained.state_dict()) == []
    assert deep_equal(optimizer2.state_dict(), optimizer.state_dict()) == []
    assert deep_equal(frozen2.state_dict(), frozen.state_dict()) == []
    resumed.close()
    assert kept.path.name == "step_00000002"


def test_a_damaged_blob_is_detected_and_the_previous_checkpoint_used(tmp_path):
    frozen, trained, optimizer = frozen_and_trained()
    with Checkpointer(tmp_path, parts={"frozen": frozen, "trained": trained}, optimizer=optimizer,
                      differential=True) as ckpt:  # fmt: skip
        ckpt.save(TrainState(global_step=1), "interval")
        train_step(trained, optimizer)
        ckpt.save(TrainState(global_step=2), "interval")
    step2 = CheckpointStore(tmp_path).committed()[-1].path
    only_in_2 = set(read_manifest(step2)["blobs"]) - set(read_manifest(tmp_path / "checkpoints/step_00000001")["blobs"])
    damage_blob(tmp_path, sorted(only_in_2)[0])
    store = CheckpointStore(tmp_path)
    assert store.newest_valid()[0].step == 1  # step 2 skipped: its blob no longer matches
    assert step2.exists()


def test_compression_round_trips_exactly_and_shrinks_bf16(tmp_path):
    torch.manual_seed(0)
    tensors = {"bf16": torch.randn(256, 1024).to(torch.bfloat16), "fp32": torch.randn(256, 1024) * 0.02}
    store = BlobStore(tmp_path, compress=True)
    refs: dict = {}
    skeleton = store.externalize(tensors, refs)
    assert {e["codec"] for e in refs.values()} == {"zst"}
    assert deep_equal(store.internalize(skeleton, refs), tensors) == []
    stored = {name: entry["bytes"] for name, entry in refs.items()}
    bf16_name = skeleton["bf16"]["__telepathy_blob__"]
    assert tensor_bytes([tensors["bf16"]]) / stored[bf16_name] >= 1.3
    assert store.verify(refs) is None


def test_a_damaged_shared_blob_is_rewritten_at_the_next_save(tmp_path):
    frozen, trained, optimizer = frozen_and_trained()
    parts = {"frozen": frozen, "trained": trained}
    with Checkpointer(tmp_path, parts=parts, optimizer=optimizer, differential=True) as ckpt:
        ckpt.save(TrainState(global_step=1), "interval")
    step1 = tmp_path / "checkpoints/step_00000001"
    frozen_blob = frozen.weight.detach().reshape(-1).view(torch.uint8).numpy()
    damage_blob(tmp_path, xxhash.xxh3_128_hexdigest(frozen_blob), "zero")  # bit rot in the blob they share
    assert CheckpointStore(tmp_path).newest_valid() is None
    with Checkpointer(tmp_path, parts=parts, optimizer=optimizer, differential=True) as ckpt:  # a new process
        ckpt.save(TrainState(global_step=2), "interval")
    store = CheckpointStore(tmp_path)
    assert store.newest_valid()[0].step == 2  # written again from the tensor in memory, not named where it rotted
    with pytest.raises(CheckpointInvalid, match="xxh3_128 does not match"):
        store.catalog.verify(step1)  # a pack is never written in place: step 1 stays detectably damaged


def test_a_dead_blob_written_again_survives_its_slow_background_delete(tmp_path):
    """Dead blobs are renamed aside at once and deleted later: a save that writes the same bytes again meanwhile
    (a tensor back to an earlier value) gets a file of its own that the pending delete cannot take."""
    store = CheckpointStore(tmp_path, RetentionPolicy(keep_last=1, keep_best=False), differential=True)
    store.prepare()
    pending = []
    store.catalog.delete = pending.append  # the background deleter, slowed down to "after everything else"
    first, second = torch.full((64, 1024), 1.0), torch.full((64, 1024), 2.0)  # 256 KiB each: blobs
    try:
        store.save(1, {"model": {"w": first}}, {"reason": "interval"})
        store.save(2, {"model": {"w": second}}, {"reason": "interval"})  # step 1 pruned: first's blob is dead
        assert pending, "nothing was set aside for deletion"
        path = store.save(3, {"model": {"w": first.clone()}}, {"reason": "interval"})  # the same bytes again
        for trash in pending:  # the slow delete lands only now
            shutil.rmtree(trash)
        assert verify_directory(path) and store.catalog.verify_blobs(read_manifest(path)["blobs"]) is None
        assert torch.equal(CheckpointStore.load_part(path, "model")["w"], first)
    finally:
        store.close()


def test_a_dead_writers_blob_trash_is_deleted_and_a_users_directory_is_not(tmp_path):
    store = CheckpointStore(tmp_path, RetentionPolicy(keep_last=1, keep_best=False), differential=True)
    store.prepare()
    try:
        store.save(1, {"model": {"w": torch.ones(64, 1024)}}, {"reason": "interval"})
        stale = tmp_path / BLOBS / f".trash-blobs-{os.getpid()}-0123abcd"  # a dead writer's, with our pid (containers)
        stale.mkdir()
        (stale / "left").write_bytes(b"x")
        mine = tmp_path / BLOBS / ".trash-my-notes"
        mine.mkdir()
        (mine / "notes.txt").write_text("keep me")
        store.save(2, {"model": {"w": torch.zeros(64, 1024)}}, {"reason": "interval"})
    finally:
        store.close()
    assert not stale.exists(), "a dead writer's blob trash was left behind"
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not list((tmp_path / BLOBS).glob(".trash-blobs-*")), "this writer's own trash was not deleted at close"
