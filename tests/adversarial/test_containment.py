"""Rule 1, containment: every path the library reads, writes or deletes is inside the save dir and of the expected
kind, and it deletes only what it created. Symlinked ``checkpoints/``, ``emergency/``, ``blobs/``, ``events.jsonl``
and ``.telepathy.lock`` are refused by every writer (UsageError; exit 2 for programs); pruning and blob garbage
collection never follow a link out; loading reads only the regular files a manifest lists."""

from __future__ import annotations

import os
import shutil

import pytest
from adversary import (
    Payload,
    assert_one_line_error,
    assert_still_verified,
    audit,
    checkpointer,
    cli,
    escapes,
    files_read_in,
    make_run,
    program,
    read_manifest_doc,
    reseal,
    save_raw,
    step_dir,
    verified,
)

from telepathy.disk.save_dir import SaveDir
from telepathy.errors import UsageError
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.train_state import TrainState

DIR_ENTRIES = ["checkpoints", "emergency", "blobs"]
FILE_ENTRIES = ["events.jsonl", ".telepathy.lock", ".telepathy.lock.json"]
REFUSED = ["checkpoints", "emergency", "blobs", "events.jsonl", ".telepathy.lock"]  # the rule's list


def link_entry(save_dir, outside, entry, target):
    """Replace ``save_dir/entry`` with a symlink to an outside directory, an outside file, or nowhere."""
    path = save_dir / entry
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    destination = {"dir": outside.dir / "linked", "file": outside.notes, "dangling": outside.dir / "missing"}[target]
    if target == "dir":
        destination.mkdir(exist_ok=True)
        outside.seal()
    os.symlink(destination, path)
    return path


def populated(save_dir):
    """A run whose entries all exist (differential: blobs/; an emergency checkpoint: emergency/)."""
    paths = make_run(save_dir, fmt="differential")
    with checkpointer(save_dir, fmt="differential") as ckpt:
        ckpt.save_emergency(TrainState(global_step=4), RuntimeError("test"))
    return paths


# ------------------------------------------------------------------------------- symlinked entries, writers
@pytest.mark.parametrize("target", ["dir", "file", "dangling"])
@pytest.mark.parametrize("entry", DIR_ENTRIES + FILE_ENTRIES)
def test_a_writer_refuses_a_symlinked_entry(save_dir, outside, entry, target):
    paths = [] if entry == "checkpoints" else populated(save_dir)
    save_dir.mkdir(exist_ok=True)
    link_entry(save_dir, outside, entry, target)
    with audit() as records:
        with pytest.raises(UsageError, match="symbolic link"):
            CheckpointStore(save_dir).prepare()
        with pytest.raises(UsageError, match="symbolic link"):
            checkpointer(save_dir)
    assert escapes(records, outside.root, save_dir) == []
    outside.assert_unchanged()
    assert_still_verified([p for p in paths if entry != "blobs"])


@pytest.mark.parametrize("entry", ["checkpoints", "emergency", "blobs", "events.jsonl", ".telepathy.lock",
                                   ".telepathy.lock.json"])  # fmt: skip
def test_a_writer_refuses_an_entry_of_the_wrong_kind(save_dir, outside, entry):
    save_dir.mkdir()
    path = save_dir / entry
    if entry in DIR_ENTRIES:
        path.write_text("not a directory")
    else:
        path.mkdir()
    with pytest.raises(UsageError, match="exists but is not"):
        CheckpointStore(save_dir).prepare()
    outside.assert_unchanged()


@pytest.mark.slow
@pytest.mark.parametrize("entry", REFUSED)
def test_the_test_tool_refuses_a_symlinked_entry_with_one_line_and_exit_2(save_dir, outside, entry):
    save_dir.mkdir()
    link_entry(save_dir, outside, entry, "dir" if entry in DIR_ENTRIES else "file")
    done = program("telepathy.test_preemption", "--save_dir", str(save_dir), "--duration", "1", "--samples", "32")
    assert_one_line_error(done, 2)
    assert "symbolic link" in done.text
    outside.assert_unchanged()


@pytest.mark.parametrize("entry", REFUSED)
def test_prune_refuses_a_symlinked_entry_with_one_line_and_exit_2(save_dir, outside, entry):
    paths = [] if entry == "checkpoints" else populated(save_dir)
    save_dir.mkdir(exist_ok=True)
    link_entry(save_dir, outside, entry, "dir" if entry in DIR_ENTRIES else "file")
    with audit() as records:
        done = cli("prune", str(save_dir), "--keep_last", "1", "--no-keep_best")
    assert_one_line_error(done, 2)
    assert escapes(records, outside.root, save_dir) == []
    outside.assert_unchanged()
    assert_still_verified([p for p in paths if entry != "blobs"])


@pytest.mark.parametrize("entry", REFUSED)
def test_prune_dry_run_with_a_symlinked_entry_touches_nothing(save_dir, outside, entry):
    paths = [] if entry == "checkpoints" else populated(save_dir)
    save_dir.mkdir(exist_ok=True)
    link_entry(save_dir, outside, entry, "dir" if entry in DIR_ENTRIES else "file")
    with audit() as records:
        done = cli("prune", str(save_dir), "--keep_last", "1", "--dry-run")
    assert "Traceback" not in done.text and done.code in (0, 2), done.text
    assert [kind for kind, _ in escapes(records, outside.root, save_dir) if kind != "list"] == []
    outside.assert_unchanged()
    assert_still_verified([p for p in paths if entry != "blobs"])


# ---------------------------------------------------------------- pruning and blob GC among hostile entries
def free_shard(save_dir):
    taken = {p.name for p in (save_dir / "blobs").iterdir()} if (save_dir / "blobs").is_dir() else set()
    return next(f"{n:02x}" for n in range(256) if f"{n:02x}" not in taken)


def hostile(save_dir, outside, kind):
    """Put one hostile entry into a populated save dir; returns the user's paths that must survive."""
    checkpoints = save_dir / "checkpoints"
    if kind == "step-symlink":
        os.symlink(outside.checkpoint, checkpoints / "step_00000000")
        return [checkpoints / "step_00000000"]
    if kind == "tmp-symlink":
        os.symlink(outside.dir, checkpoints / ".tmp-step_00000005-otherhost-1-abcd1234")
        return []
    if kind == "trash-symlink":
        os.symlink(outside.dir, checkpoints / ".trash-step_00000001-1-abcd1234")
        return []
    if kind == "tmp-dir-with-link":
        tmp = checkpoints / ".tmp-step_00000005-otherhost-1-abcd1234"
        tmp.mkdir()
        os.symlink(outside.dir, tmp / "evil")
        os.symlink(outside.notes, tmp / "model.pt")
        return []
    if kind == "emergency-tmp-symlink":
        (save_dir / "emergency").mkdir(exist_ok=True)
        os.symlink(outside.dir, save_dir / "emergency" / ".tmp-step_00000005-otherhost-1-abcd1234")
        return []
    if kind == "blob-shard-symlink":
        shard = save_dir / "blobs" / free_shard(save_dir)
        os.symlink(outside.dir / "blobs" / "ab", shard)
        return [shard]
    if kind == "blob-file-symlink":
        shard = save_dir / "blobs" / free_shard(save_dir)
        shard.mkdir()
        os.symlink(outside.notes, shard / (shard.name + "1" * 30 + ".raw"))
        return []
    if kind == "latest-outside":
        os.unlink(save_dir / "latest")
        os.symlink(outside.checkpoint, save_dir / "latest")
        return []
    if kind == "link-inside-pruned-checkpoint":
        os.symlink(outside.dir, step_dir(save_dir, 1) / "extra")
        return []
    if kind == "unknown-entries":
        (checkpoints / "notes.txt").write_text("mine")
        (checkpoints / "step_00000001.bak").mkdir()
        (checkpoints / "step_abc").mkdir()
        (checkpoints / ".invalid-step_00000007-1").mkdir()
        return [checkpoints / "notes.txt", checkpoints / "step_00000001.bak", checkpoints / "step_abc",
                checkpoints / ".invalid-step_00000007-1"]  # fmt: skip
    if kind == "step-dir-without-manifest":
        (checkpoints / "step_00000000").mkdir()
        (checkpoints / "step_00000000" / "model.pt").write_bytes(b"someone's")
        return [checkpoints / "step_00000000" / "model.pt"]
    if kind == "step-dir-with-foreign-manifest":
        (checkpoints / "step_00000000").mkdir()
        (checkpoints / "step_00000000" / "manifest.json").write_text('{"format": "someone-else", "files": {}}')
        return [checkpoints / "step_00000000" / "manifest.json"]
    if kind == "non-blob-files-in-blobs":
        (save_dir / "blobs" / "README").write_text("mine")
        shard = save_dir / "blobs" / free_shard(save_dir)
        shard.mkdir()
        (shard / "notes.txt").write_text("mine")
        (shard / (shard.name + "2" * 30 + ".raw")).mkdir()  # a directory named like a blob
        return [save_dir / "blobs" / "README", shard / "notes.txt", shard / (shard.name + "2" * 30 + ".raw")]
    if kind == "emergency-checkpoint":
        with checkpointer(save_dir, fmt="differential") as ckpt:
            path = ckpt.save_emergency(TrainState(global_step=2), RuntimeError("test"))
        return [path / "manifest.json"]
    raise ValueError(kind)


HOSTILE = ["step-symlink", "tmp-symlink", "trash-symlink", "tmp-dir-with-link", "emergency-tmp-symlink",
           "blob-shard-symlink", "blob-file-symlink", "latest-outside", "link-inside-pruned-checkpoint",
           "unknown-entries", "step-dir-without-manifest", "step-dir-with-foreign-manifest",
           "non-blob-files-in-blobs", "emergency-checkpoint"]  # fmt: skip


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_live_run_prunes_and_collects_blobs_without_reaching_outside(save_dir, outside, kind):
    make_run(save_dir, fmt="differential")
    survivors = hostile(save_dir, outside, kind)
    with audit() as records:
        with checkpointer(save_dir, fmt="differential", keep_last=1, keep_best=False) as ckpt:
            state = ckpt.resume()
            assert state.global_step == 3
            state.global_step = 4
            newest = ckpt.save(state, "interval")
    assert escapes(records, outside.root, save_dir) == []
    outside.assert_unchanged()
    assert [p.name for p in verified(save_dir) if p.parent.name == "checkpoints"] == [newest.name]
    assert_still_verified([newest])
    for path in survivors:
        assert os.path.lexists(path), f"{path} (not telepathy's) was deleted"


@pytest.mark.parametrize("kind", HOSTILE)
def test_the_prune_command_never_reaches_outside(save_dir, outside, kind):
    make_run(save_dir, fmt="differential")
    survivors = hostile(save_dir, outside, kind)
    newest = step_dir(save_dir, 3)
    with audit() as records:
        done = cli("prune", str(save_dir), "--keep_last", "1", "--no-keep_best")
    assert done.code == 0 and "Traceback" not in done.text, done.text
    assert escapes(records, outside.root, save_dir) == []
    outside.assert_unchanged()
    assert_still_verified([newest])
    for path in survivors:
        assert os.path.lexists(path), f"{path} (not telepathy's) was deleted"


# ------------------------------------------------------------------------------------------------ part names
@pytest.mark.parametrize("name", ["../escaped", "a/b", "/abs/olute", ".hidden", "line\nbreak", "a..b", ""])
def test_a_part_name_that_would_escape_is_refused_and_nothing_is_written_outside(save_dir, outside, name):
    with audit() as records:
        with pytest.raises(ValueError):
            with checkpointer(save_dir, model=None) as ckpt:
                ckpt.parts = {name: ckpt.parts["model"]}
                ckpt.save(TrainState(global_step=1), "interval")
    assert escapes(records, outside.root, save_dir) == []
    outside.assert_unchanged()
    assert not (save_dir / "checkpoints").exists() or not any(
        p.name.startswith("step_") for p in (save_dir / "checkpoints").iterdir()
    )
    assert not any(save_dir.parent.glob("escaped*")) and not (save_dir.parent / "b.pt").exists()


# ----------------------------------------------------------------------------- manifests naming outside files
ESCAPING_NAMES = {
    "relative": lambda d, o: os.path.relpath(o.weights, d),
    "absolute": lambda d, o: str(o.weights),
    "subdirectory": lambda d, o: "sub/model.pt",
    "hidden": lambda d, o: ".model.pt",
    "dot-dot": lambda d, o: "..",
    "trailing-newline": lambda d, o: "model.pt\n",
    "trailing-slash": lambda d, o: "model.pt/",
    "nul": lambda d, o: "model.pt\x00",
}


@pytest.mark.parametrize("how", sorted(ESCAPING_NAMES))
def test_a_manifest_naming_a_file_outside_is_never_followed(save_dir, outside, run3, how, caplog):
    newest = run3[-1]
    name = ESCAPING_NAMES[how](newest, outside)
    if how == "subdirectory":
        (newest / "sub").mkdir()
        shutil.copy(outside.weights, newest / "sub" / "model.pt")
    reseal(newest, hash_from={name: outside.weights}, drop=["model.pt"])
    with audit() as records:
        with checkpointer(save_dir, model=None) as ckpt:
            state = ckpt.resume()
        listing = cli("list", str(save_dir))
        verifying = cli("verify", str(save_dir), "--load")
        exporting = cli("export", str(save_dir), "--out", str(save_dir / "export"))
    assert state.global_step == 2 and "skipping checkpoint" in caplog.text
    assert verifying.code == 1 and f"FAILED {newest}" in verifying.out
    assert "Traceback" not in listing.text + exporting.text and listing.code == 0
    assert escapes(records, outside.root, save_dir) == []
    outside.assert_unchanged()
    assert_still_verified(run3[:2])


# ------------------------------------------------------------------------- loading reads listed files only
@pytest.mark.parametrize("fmt", ["full", "differential", "compressed"])
@pytest.mark.parametrize("operation", ["resume", "verify --load", "export", "list"])
def test_loading_reads_only_the_files_the_manifest_lists(save_dir, outside, fmt, operation):
    paths = make_run(save_dir, fmt=fmt)
    newest = paths[-1]
    marker = outside.root / "pwned"
    save_raw(newest / "evil.pt", {"weight": Payload(str(marker))})  # unlisted, next to the listed ones
    save_raw(newest / "optimizer.pt.bak", {"x": 1})
    os.symlink(outside.weights, newest / "linked.pt")
    listed = set(read_manifest_doc(newest)["files"]) | {"manifest.json"}
    blob_files = {SaveDir(save_dir).blob_file(n, e) for path in paths  # what any checkpoint's manifest lists
                  for n, e in (read_manifest_doc(path).get("blobs") or {}).items()}  # fmt: skip
    blobs = {f"{f.parent.name}/{f.name}" for f in blob_files}
    with audit() as records:
        if operation == "resume":
            with checkpointer(save_dir, fmt=fmt) as ckpt:
                assert ckpt.resume().global_step == 3
        elif operation == "verify --load":
            assert cli("verify", str(newest), "--load").code == 0
        elif operation == "export":
            done = cli("export", str(save_dir), "--out", str(save_dir / "export"))
            assert done.code == 0, done.text
        else:
            assert cli("list", str(save_dir)).code == 0
    read = files_read_in(records, newest)
    assert read <= listed, f"read files the manifest does not list: {sorted(read - listed)}"
    blobs_read = files_read_in(records, save_dir / "blobs")
    assert blobs_read <= blobs | {f"{b}" for b in blobs_read if b.startswith(".tmp-")}, sorted(blobs_read - blobs)
    assert escapes(records, outside.root, save_dir) == [] and not marker.exists()
    outside.assert_unchanged()
    assert_still_verified(paths)


# -------------------------------------------------------------- readers with a symlinked blobs/ or latest
@pytest.mark.parametrize("operation", ["verify", "verify --load", "list", "export"])
def test_readers_never_load_blobs_through_a_symlinked_blobs_dir(save_dir, outside, operation):
    make_run(save_dir, fmt="differential")
    moved = outside.dir / "their_blobs"
    shutil.move(save_dir / "blobs", moved)  # same bytes, now outside: every hash would still match
    os.symlink(moved, save_dir / "blobs")
    outside.seal()
    with audit() as records:
        if operation.startswith("verify"):
            done = cli(*operation.split()[:1], str(save_dir), *operation.split()[1:])
        elif operation == "list":
            done = cli("list", str(save_dir))
        else:
            done = cli("export", str(save_dir), "--out", str(save_dir / "export"))
    assert "Traceback" not in done.text, done.text
    reads = [(kind, path) for kind, path in escapes(records, outside.root, save_dir) if kind != "list"]
    assert reads == [], f"{operation} read outside the save dir through blobs/: {reads[:3]}"
    assert not (save_dir / "export" / "model.safetensors").exists()
    outside.assert_unchanged()


@pytest.mark.parametrize("operation", ["status", "list", "verify", "export", "prune"])
def test_a_latest_pointing_at_an_outside_checkpoint_is_never_read(save_dir, outside, run3, operation):
    os.unlink(save_dir / "latest")
    os.symlink(outside.checkpoint, save_dir / "latest")
    with audit() as records:
        if operation == "export":
            done = cli("export", str(save_dir), "--out", str(save_dir / "export"))
        elif operation == "prune":
            done = cli("prune", str(save_dir), "--keep_last", "1", "--no-keep_best")
        else:
            done = cli(operation, str(save_dir))
    assert "Traceback" not in done.text and done.code in (0, 1), done.text
    reads = [(kind, path) for kind, path in escapes(records, outside.root, save_dir) if kind != "list"]
    assert reads == [], reads[:3]
    outside.assert_unchanged()
    assert_still_verified(run3[-1:])
