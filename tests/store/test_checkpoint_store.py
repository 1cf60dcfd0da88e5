"""Checkpoint store: commit protocol, verification, safe loading, retention. Real files, real fsync."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from telepathy.disk import durable
from telepathy.disk.manifest import CheckpointInvalid, hash_file, self_hash, verify_directory
from telepathy.disk.retention import RetentionPolicy
from telepathy.store.checkpoint_store import CheckpointStore, CheckpointWriteError, UnsafeCheckpointError


def save(store: CheckpointStore, step: int, metric: float | None = None, **kw) -> Path:
    files = {"encoder": {"w": torch.full((64,), float(step))}, "optimizer": {"lr": 0.1}, "state": {"step": step}}
    return store.save(step, files, {"reason": "test", "metric": metric}, **kw)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    s = CheckpointStore(tmp_path / "run", RetentionPolicy(keep_last=None))
    s.prepare()
    return s


def test_layout_manifest_and_latest(store: CheckpointStore):
    path = save(store, 1200)
    assert path == store.save_dir / "checkpoints" / "step_00001200"
    assert sorted(p.name for p in path.iterdir()) == ["encoder.pt", "manifest.json", "optimizer.pt", "state.pt"]
    assert os.readlink(store.save_dir / "latest") == "checkpoints/step_00001200"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["step"] == 1200
    assert manifest["manifest_xxh3_128"] == self_hash(manifest)
    assert manifest["files"]["state.pt"]["bytes"] == (path / "state.pt").stat().st_size
    assert manifest["files"]["state.pt"]["xxh3_128"] == hash_file(path / "state.pt")
    assert [p.name for p in store.checkpoints_dir.iterdir()] == ["step_00001200"], "no temporary leftovers"
    assert torch.equal(store.load_part(path, "encoder")["w"], torch.full((64,), 1200.0))


def test_commit_protocol_order(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch):
    """Every file fsynced, then the temp dir, then rename, then the parent fsynced, then latest moved."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    save(store, 7)
    kinds = [(k, Path(p).name) for k, p in events]
    rename_at = kinds.index(("rename", "step_00000007"))
    synced_before = {name for kind, name in kinds[:rename_at] if kind == "fsync"}
    assert {"encoder.pt", "optimizer.pt", "state.pt", "manifest.json"} <= synced_before
    assert any(n.startswith(".tmp-step_00000007") for n in synced_before), "temp dir fsynced before rename"
    after = kinds[rename_at + 1 :]
    assert after[0] == ("fsync", "checkpoints"), "rename made durable before anything else"
    assert ("replace", "latest") in after and after[-1] == ("fsync", "run")
    files_order = [n for k, n in kinds[:rename_at] if k == "fsync" and n.endswith((".pt", ".json"))]
    assert files_order.index("state.pt") > files_order.index("encoder.pt"), "weights before state"
    assert files_order[-1] == "manifest.json", "manifest last"


CORRUPTIONS = {
    "flip": lambda p: p.write_bytes(_flip(p.read_bytes())),
    "truncate": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "zero": lambda p: p.write_bytes(bytes(p.stat().st_size)),
    "delete": lambda p: p.unlink(),
}


def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


@pytest.mark.parametrize("mode", sorted(CORRUPTIONS))
@pytest.mark.parametrize("victim", ["encoder.pt", "optimizer.pt", "state.pt", "manifest.json"])
def test_corrupt_newest_is_skipped_with_named_warning(store, mode, victim, caplog):
    save(store, 10)
    newest = save(store, 20)
    CORRUPTIONS[mode](newest / victim)
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        ref, _ = store.newest_valid()
    assert ref.step == 10
    assert victim in caplog.text and "step_00000020" in caplog.text and "trying the next older one" in caplog.text


def test_latest_pointing_at_missing_dir_falls_back(store, caplog):
    save(store, 10)
    durable.atomic_symlink(store.save_dir / "latest", "checkpoints/step_00000099")
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        ref, _ = store.newest_valid()
    assert ref.step == 10 and "does not exist" in caplog.text


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_without_running(store, tmp_path):
    marker = tmp_path / "pwned"
    path = save(store, 5)
    (path / "state.pt").unlink()
    torch.save({"step": 5, "evil": _Payload(str(marker))}, path / "state.pt")
    manifest = json.loads((path / "manifest.json").read_text())  # an attacker can rewrite the manifest too
    manifest["files"]["state.pt"] = {
        "bytes": (path / "state.pt").stat().st_size,
        "xxh3_128": hash_file(path / "state.pt"),
    }
    manifest["manifest_xxh3_128"] = self_hash(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    verify_directory(path)
    with pytest.raises(UnsafeCheckpointError, match="not a safe checkpoint"):
        store.load_part(path, "state")
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize(
    "entry_name, entry, reason",
    [
        ("../../x.pt", {"bytes": 1, "xxh3_128": "0"}, "escape"),
        ("adapter_..%2Fx.pt", {"bytes": 1, "xxh3_128": "0"}, "escape"),
        ("state.pt", {"bytes": 1 << 60, "xxh3_128": "0"}, "plausible"),
        ("state.pt", {"bytes": -1, "xxh3_128": "0"}, "plausible"),
    ],
)
def test_hostile_manifest_entries_are_refused(store, entry_name, entry, reason):
    path = save(store, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][entry_name] = entry
    manifest["manifest_xxh3_128"] = self_hash(manifest)  # a consistent (attacker-written) manifest
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointInvalid, match=reason):
        verify_directory(path)


def test_symlink_inside_checkpoint_is_refused(store, tmp_path):
    path = save(store, 5)
    outside = tmp_path / "outside.pt"
    os.rename(path / "encoder.pt", outside)
    os.symlink(outside, path / "encoder.pt")
    with pytest.raises(CheckpointInvalid, match="not a regular file"):
        verify_directory(path)


def test_stale_temporaries_are_cleaned_and_foreign_files_kept(store):
    stale = store.checkpoints_dir / ".tmp-step_00000003-host-999999-abcd"
    stale.mkdir()
    (stale / "encoder.pt").write_bytes(b"partial")
    mine = store.checkpoints_dir / "my_notes"
    mine.mkdir()
    store.prepare()
    assert not stale.exists() and mine.exists()


def test_retention_keeps_last_best_and_every_kth(tmp_path):
    store = CheckpointStore(tmp_path / "run", RetentionPolicy(keep_last=2, keep_every=10, keep_best=True))
    store.prepare()
    foreign = store.checkpoints_dir / "step_00000001"  # looks like ours but has no manifest: not ours
    foreign.mkdir()
    for step in range(2, 26):
        save(store, step, metric=1.0 if step != 7 else 0.1)
    assert [r.step for r in store.committed()] == [1, 7, 10, 20, 24, 25]
    assert foreign.exists()


def test_same_step_twice_keeps_the_committed_one(store):
    first = save(store, 5)
    inode = first.stat().st_ino
    assert save(store, 5) == first and first.stat().st_ino == inode
    (first / "state.pt").write_bytes(b"garbage")
    save(store, 5)
    verify_directory(first)
    assert list(store.checkpoints_dir.glob(".invalid-step_00000005-*")), "the invalid one is set aside, not deleted"


def test_emergency_checkpoints_are_not_resumed_automatically(store):
    save(store, 5)
    emergency = save(store, 9, emergency=True)
    assert emergency.parent == store.save_dir / "emergency"
    assert store.newest_valid()[0].step == 5
    assert os.readlink(store.save_dir / "latest") == "checkpoints/step_00000005"
    verify_directory(emergency)


def test_failed_save_leaves_previous_latest_and_no_temporaries(store, monkeypatch):
    save(store, 5)
    calls = {"n": 0}
    real = durable.write_file_durably

    def failing(path, write):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(durable, "write_file_durably", failing)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device \(ENOSPC\)"):
        save(store, 6)
    assert [p.name for p in store.checkpoints_dir.iterdir()] == ["step_00000005"]
    assert store.newest_valid()[0].step == 5


def test_save_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        CheckpointStore(tmp_path / "file").prepare()


def test_retention_policy_validation():
    with pytest.raises(ValueError, match="keep_last"):
        RetentionPolicy(keep_last=0)
    assert RetentionPolicy(keep_last=1, keep_best=True).steps_to_keep({1: 0.5, 2: 0.9, 3: float("nan")}) == {1, 3}
    assert RetentionPolicy(keep_last=1, higher_is_better=True).steps_to_keep({1: 0.5, 2: 0.9, 3: None}) == {2, 3}
