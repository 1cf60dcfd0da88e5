"""Rule 7, layouts users make: a ``latest`` that is a real directory (copied by a tool that follows links) is set aside
(renamed, never deleted) and pruning works; a FIFO or a device node where a part file, a blob, a manifest, the event
log or the lock should be never hangs anything; a symlink to weights outside the save dir is never loaded."""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
import threading
import time

import pytest
import torch
from adversary import (
    assert_still_verified,
    audit,
    checkpointer,
    cli,
    escapes,
    load_raw,
    make_run,
    read_manifest_doc,
    reseal,
    step_dir,
    verified,
)

from telepathy.disk.save_dir import SaveDir
from telepathy.errors import UsageError
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.train_state import TrainState

WATCHDOG = 4.0  # seconds an operation may take before it counts as hung


# ------------------------------------------------------------------------------------ latest/ as a directory
def copy_latest(save_dir):
    os.unlink(save_dir / "latest")
    shutil.copytree(save_dir / "checkpoints" / "step_00000003", save_dir / "latest")  # what `cp -rL` makes
    (save_dir / "latest" / "my-notes.txt").write_text("added to the copy by hand")


def copies_set_aside(save_dir):
    return [p for p in save_dir.iterdir() if p.name.startswith("latest") and p.name != "latest"]


def test_a_writer_sets_a_copied_latest_aside_and_the_next_save_links_latest_again(save_dir, run3):
    copy_latest(save_dir)
    with checkpointer(save_dir) as ckpt:
        assert ckpt.resume().global_step == 3
        newest = ckpt.save(TrainState(global_step=4, batch_idx=4), "interval")
    aside = copies_set_aside(save_dir)
    assert len(aside) == 1 and (aside[0] / "my-notes.txt").read_text() == "added to the copy by hand"
    assert filecmp.cmp(aside[0] / "model.pt", run3[-1] / "model.pt", shallow=False)
    assert (save_dir / "latest").is_symlink() and (save_dir / "latest").resolve() == newest
    assert_still_verified([*run3, newest])


def test_a_latest_copied_twice_within_a_second_is_set_aside_twice(save_dir, run3):
    now = int(time.time())
    for t in range(now - 1, now + 4):  # an earlier copy already set aside under every name this second could give
        shutil.copytree(run3[0], save_dir / f"latest.copy-{t}")
    copy_latest(save_dir)
    store = CheckpointStore(save_dir)
    try:
        store.prepare()
    finally:
        store.close()
    assert not (save_dir / "latest").is_dir() or (save_dir / "latest").is_symlink()
    notes = [p for p in copies_set_aside(save_dir) if (p / "my-notes.txt").exists()]
    assert len(notes) == 1 and len(copies_set_aside(save_dir)) == 6
    assert_still_verified(run3)


@pytest.mark.parametrize("verb", ["prune", "status", "list", "verify", "export"])
def test_operator_tools_work_with_a_copied_latest_and_never_delete_it(tmp_path, save_dir, run3, verb):
    copy_latest(save_dir)
    extra = {"prune": ["--keep_last", "1", "--no-keep_best"], "export": ["--out", str(tmp_path / "out")]}.get(verb, [])
    done = cli(verb, str(save_dir), *extra)
    assert "Traceback" not in done.text and done.code == 0, done.text[-2000:]
    kept = [save_dir / "latest", *copies_set_aside(save_dir)]
    assert any((p / "my-notes.txt").exists() for p in kept if p.is_dir()), "the copied latest was deleted"
    if verb == "prune":
        assert [p.name for p in verified(save_dir)] == ["step_00000003"]
    else:
        assert_still_verified(run3)


@pytest.mark.parametrize("kind", ["a regular file", "a FIFO"])
def test_a_latest_that_is_not_a_symlink_is_never_deleted_by_a_save(save_dir, run3, kind):
    os.unlink(save_dir / "latest")
    if kind == "a regular file":
        (save_dir / "latest").write_text("an operator's note called latest")
    else:
        os.mkfifo(save_dir / "latest")
    before = os.lstat(save_dir / "latest").st_ino
    try:
        with checkpointer(save_dir) as ckpt:
            ckpt.save(TrainState(global_step=4, batch_idx=4), "interval")
    except UsageError:
        pass  # refusing is fine too
    survivors = [p for p in save_dir.iterdir() if p.name.startswith("latest") and os.lstat(p).st_ino == before]
    assert survivors, f"{kind} named latest was deleted (replaced by the symlink)"
    assert_still_verified(run3)


# ---------------------------------------------------------------------------- FIFOs and device nodes
def make_special(path, kind):
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's device


def release(path):
    """Open the other end of a FIFO (without blocking) so that whoever waits in open() goes on."""
    for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
        try:
            fd = os.open(path, flags)
        except OSError:
            continue
        os.close(fd)


def within_watchdog(fn, fifos):
    """Run ``fn`` in a thread; (hung?, its result or exception). A call stuck on a FIFO is set free afterwards
    (so that the suite goes on) and reported as hung."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WATCHDOG)
    hung = thread.is_alive()
    for _ in range(200):
        if not thread.is_alive():
            break
        for path in fifos:
            release(path)
        thread.join(0.05)
    return hung, outcome.get("error", outcome.get("result"))


POSITIONS = ["model.pt", "state.pt", "manifest.json", "a blob", "an unlisted file", "events.jsonl",
             ".telepathy.lock.json", ".telepathy.lock"]  # fmt: skip
ROOT_FILES = ("events.jsonl", ".telepathy.lock.json", ".telepathy.lock")
OPERATIONS = ["resume", "save and prune", "verify", "verify --load", "list", "status", "export", "prune"]


def own_weight_blob(save_dir, checkpoint):
    """The blob holding this checkpoint's weight (the weights change at every step: no other checkpoint uses it)."""
    name = load_raw(checkpoint / "model.pt")["weight"]["__telepathy_blob__"]
    entry = read_manifest_doc(checkpoint)["blobs"][name]
    return SaveDir(save_dir).blob_file(name, entry)  # its own file, or the pack holding it


def place(save_dir, paths, position, kind):
    newest = paths[-1]
    if position == "a blob":
        target = own_weight_blob(save_dir, newest)
    elif position == "an unlisted file":
        target = newest / "extra.pt"
    elif position in ROOT_FILES:
        target = save_dir / position
    else:
        target = newest / position
    make_special(target, kind)
    return target


def operation(name, save_dir, tmp_path):
    if name == "resume":
        with checkpointer(save_dir, fmt="differential") as ckpt:
            return ckpt.resume().global_step
    if name == "save and prune":
        with checkpointer(save_dir, fmt="differential", keep_last=1, keep_best=False) as ckpt:
            state = ckpt.resume()
            state.global_step = 4
            return ckpt.save(state, "interval")
    extra = {"prune": ["--keep_last", "1", "--no-keep_best"], "export": ["--out", str(tmp_path / "out")],
             "verify --load": ["--load"]}.get(name, [])  # fmt: skip
    return cli(name.split()[0], str(save_dir), *extra)


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("position", POSITIONS)
def test_a_special_file_in_place_of_a_file_never_hangs_anything(tmp_path, save_dir, position, kind, op):
    paths = make_run(save_dir, fmt="differential")
    target = place(save_dir, paths, position, kind)
    hung, result = within_watchdog(lambda: operation(op, save_dir, tmp_path), [target])
    assert not hung, f"{op} hung on a {kind} at {position}"
    writer = op in ("resume", "save and prune", "prune")
    if position in ROOT_FILES and writer:  # not of the expected kind: a writer refuses it, in one line for prune
        if op == "prune":
            assert result.code == 2 and "Traceback" not in result.text, result.text[-2000:]
        else:
            assert isinstance(result, UsageError), f"{op} accepted a {kind} as {position}: {result!r}"
        return
    if isinstance(result, BaseException):
        raise result
    if op == "resume":
        assert result == (3 if position in ("an unlisted file", *ROOT_FILES) else 2)
    elif op == "save and prune":
        assert_still_verified([result])
    else:
        assert "Traceback" not in result.text, result.text[-3000:]
        broken = position not in ("an unlisted file", *ROOT_FILES)
        expected = (1 if broken else 0) if op.startswith("verify") else 0
        assert result.code == expected, f"{op}: exit {result.code}: {result.text[-1500:]}"
    if op in ("save and prune", "prune"):  # retention deletes by design, but never every usable checkpoint
        assert verified(save_dir), "pruning left no checkpoint that verifies"
    else:
        assert_still_verified(paths[:2])


# --------------------------------------------------------------------- symlinks to weights outside the run
def link_outside_weights(save_dir, outside, paths, how):
    newest = paths[-1]
    if how == "newest step dir is a symlink":
        os.symlink(outside.checkpoint, save_dir / "checkpoints" / "step_00000004")
    elif how == "a part file is a symlink":
        sd = load_raw(outside.weights)
        torch.save({"weight": sd["weight"], "bias": sd["bias"]}, outside.dir / "part.pt")
        outside.seal()
        (newest / "model.pt").unlink()
        os.symlink(outside.dir / "part.pt", newest / "model.pt")
        reseal(newest, hash_from={"model.pt": outside.dir / "part.pt"})
    elif how == "a blob is a symlink":
        blob = own_weight_blob(save_dir, newest)
        shutil.copy(blob, outside.dir / "blob-copy")
        outside.seal()
        blob.unlink()
        os.symlink(outside.dir / "blob-copy", blob)
    elif how == "latest points outside":
        os.unlink(save_dir / "latest")
        os.symlink(outside.checkpoint, save_dir / "latest")
    elif how == "a step dir of links with the manifest":
        fake = save_dir / "checkpoints" / "step_00000004"
        fake.mkdir()
        for f in outside.checkpoint.iterdir():
            os.symlink(f, fake / f.name)
    else:
        raise ValueError(how)


OUTSIDE_LINKS = ["newest step dir is a symlink", "a part file is a symlink", "a blob is a symlink",
                 "latest points outside", "a step dir of links with the manifest"]  # fmt: skip


@pytest.mark.parametrize("op", ["resume", "export", "verify --load"])
@pytest.mark.parametrize("how", OUTSIDE_LINKS)
def test_weights_behind_a_symlink_out_of_the_save_dir_are_never_loaded(tmp_path, save_dir, outside, how, op):
    paths = make_run(save_dir, fmt="differential")
    link_outside_weights(save_dir, outside, paths, how)
    with audit() as records:
        if op == "resume":
            with checkpointer(save_dir, fmt="differential") as ckpt:
                state = ckpt.resume()
                weight = ckpt.parts["model"].weight.detach().clone()
            assert state.global_step in (2, 3) and not torch.all(weight == 7.0)
        elif op == "export":
            done = cli("export", str(save_dir), "--out", str(save_dir / "export"))
            assert done.code == 0 and "Traceback" not in done.text, done.text[-2000:]
        else:
            done = cli("verify", str(save_dir), "--load")
            assert "Traceback" not in done.text
    reads = [r for r in escapes(records, outside.root, save_dir) if r[0] != "list"]
    assert reads == [], f"read outside the save dir: {reads[:3]}"
    outside.assert_unchanged()
    assert_still_verified(paths[:2])
    assert step_dir(save_dir, 2).is_dir()
