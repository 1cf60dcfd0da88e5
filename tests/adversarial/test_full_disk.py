"""Rule 5, a full disk: a save that fails at any point (ENOSPC, EDQUOT, EIO: injected in-process at each step of
the commit, and for real on a small tmpfs) fails cleanly: CheckpointWriteError, the previous checkpoint verifies and
stays latest, nothing half-written is left, the loop goes on and the next save works once there is room. A failing
``events.jsonl`` never stops training; a run started on a full disk fails with one line and no traceback."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from adversary import (
    BATCHES_PER_EPOCH,
    assert_no_traceback,
    assert_still_verified,
    checkpointer,
    fill_blocks,
    fill_inodes,
    make_run,
    program,
    step_dir,
    tmpfs,
    verified,
)

from telepathy import training_signals
from telepathy.disk import durable
from telepathy.disk.events import read_events
from telepathy.errors import CheckpointWriteError
from telepathy.train_state import TrainState

ERRNOS = ["ENOSPC", "EDQUOT", "EIO"]


def fd_path(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class Faults:
    """Make one kind of filesystem call fail with ``err`` for the paths ``matches`` accepts."""

    def __init__(self, monkeypatch, call, matches, err):
        self.hits = 0
        self.err = getattr(errno, err)
        self.matches = matches
        fail = self.fail
        if call == "mkdir":
            real_mkdir = os.mkdir

            def mkdir(path, mode=0o777, *, dir_fd=None):
                fail(path)
                return real_mkdir(path, mode, dir_fd=dir_fd)

            monkeypatch.setattr(os, "mkdir", mkdir)
        elif call == "write":
            real_open = open

            class Failing:
                def __init__(self, f):
                    self.f = f

                def write(self, data):
                    self.f.write(bytes(data)[: len(data) // 2])  # half of it reached the disk
                    fail(self.f.name)
                    return self.f.write(data)

                def __getattr__(self, name):
                    return getattr(self.f, name)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return self.f.__exit__(*exc)

            def failing_open(path, mode="r", *args, **kwargs):
                f = real_open(path, mode, *args, **kwargs)
                return Failing(f) if self.matches(os.fspath(path)) and "b" in mode else f

            monkeypatch.setattr(durable, "open", failing_open, raising=False)
        elif call == "fsync":
            real_fsync = os.fsync

            def fsync(fd):
                fail(fd_path(fd))
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)
        elif call in ("rename", "replace"):
            real = getattr(os, call)

            def rename(src, dst, *args, **kwargs):
                fail(src)
                return real(src, dst, *args, **kwargs)

            monkeypatch.setattr(os, call, rename)
        elif call == "symlink":
            real_symlink = os.symlink

            def symlink(src, dst, *args, **kwargs):
                fail(dst)
                return real_symlink(src, dst, *args, **kwargs)

            monkeypatch.setattr(os, "symlink", symlink)
        else:
            raise ValueError(call)

    def fail(self, path):
        if self.matches(os.fsdecode(os.fspath(path))):
            self.hits += 1
            raise OSError(self.err, os.strerror(self.err), os.fsdecode(os.fspath(path)))


def named(predicate):
    return lambda path: predicate(os.path.basename(path.rstrip("/")), path)


# point: (call, which paths, outcome: "fails" | "commits" | "either", format)
POINTS = {
    "mkdir the temporary": ("mkdir", named(lambda b, p: b.startswith(".tmp-step")), "fails", "full"),
    "write model.pt": ("write", named(lambda b, p: b == "model.pt"), "fails", "full"),
    "write optimizer.pt": ("write", named(lambda b, p: b == "optimizer.pt"), "fails", "full"),
    "write state.pt": ("write", named(lambda b, p: b == "state.pt"), "fails", "full"),
    "write manifest.json": ("write", named(lambda b, p: b == "manifest.json"), "fails", "full"),
    "fsync model.pt": ("fsync", named(lambda b, p: b == "model.pt"), "fails", "full"),
    "fsync manifest.json": ("fsync", named(lambda b, p: b == "manifest.json"), "fails", "full"),
    "fsync the temporary dir": ("fsync", named(lambda b, p: b.startswith(".tmp-step")), "fails", "full"),
    "rename to step_N": ("rename", named(lambda b, p: b.startswith(".tmp-step")), "fails", "full"),
    "fsync checkpoints/ after the rename": ("fsync", named(lambda b, p: b == "checkpoints"), "either", "full"),
    "make the new latest": ("symlink", named(lambda b, p: b.startswith(".latest")), "commits", "full"),
    "replace latest": ("replace", named(lambda b, p: b.startswith(".latest")), "commits", "full"),
    "write a blob": ("write", named(lambda b, p: "/blobs/" in p), "fails", "differential"),
    "fsync a blob": ("fsync", named(lambda b, p: "/blobs/" in p and b.startswith(".tmp-")), "fails", "differential"),
    "publish a blob": ("replace", named(lambda b, p: "/blobs/" in p), "fails", "differential"),
    "fsync a blob shard": ("fsync", named(lambda b, p: "/blobs/" in p and len(b) == 2), "fails", "differential"),
}


def leftovers(save_dir):
    """Temporary files or directories of an unfinished save anywhere in the save dir."""
    return sorted(str(p.relative_to(save_dir)) for p in save_dir.rglob("*") if p.name.startswith(".tmp"))


def changed(ckpt):
    with torch.no_grad():
        for p in ckpt.parts["model"].parameters():
            p.add_(1.0)  # new tensors: a differential save writes new blobs


@pytest.mark.parametrize("err", ERRNOS)
@pytest.mark.parametrize("point", list(POINTS))
def test_a_save_that_fails_at_any_point_leaves_the_previous_checkpoint_standing(save_dir, monkeypatch, point, err):
    call, matches, outcome, fmt = POINTS[point]
    paths = make_run(save_dir, fmt=fmt)
    with checkpointer(save_dir, fmt=fmt) as ckpt:
        state = ckpt.resume()
        changed(ckpt)
        state = TrainState(epoch=0, global_step=4, batch_idx=4)
        with monkeypatch.context() as patch:
            faults = Faults(patch, call, matches, err)
            try:
                result = ckpt.save(state, "interval")
            except CheckpointWriteError as exc:
                result = exc
        assert faults.hits >= 1, "the fault was never reached"
        if outcome == "fails" or (outcome == "either" and isinstance(result, CheckpointWriteError)):
            assert isinstance(result, CheckpointWriteError), f"the save did not fail: {result}"
            assert f"({err})" in str(result) and "is intact and still latest" in str(result)
            assert (save_dir / "latest").resolve() == paths[-1]
            assert not step_dir(save_dir, 4).exists() or outcome == "either"
        else:
            assert isinstance(result, Path) and result == step_dir(save_dir, 4), result
        assert leftovers(save_dir) == [], "a failed save left temporaries"
        assert_still_verified(paths)
        again = ckpt.save(state, "interval")  # room again: the next save works
    assert_still_verified([again])
    with checkpointer(save_dir, fmt=fmt) as ckpt:
        assert ckpt.resume().global_step == 4


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("point", ["mkdir the temporary", "write model.pt", "write manifest.json", "write a blob"])
def test_training_goes_on_when_a_periodic_save_fails(save_dir, monkeypatch, caplog, point, async_save):
    call, matches, _, fmt = POINTS[point]
    paths = make_run(save_dir, fmt=fmt)
    with checkpointer(save_dir, fmt=fmt, every_steps=1, async_save=async_save) as ckpt:
        state = ckpt.resume()
        with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="telepathy"):
            faults = Faults(patch, call, matches, "ENOSPC")
            for _ in range(3):
                changed(ckpt)
                state.advance(BATCHES_PER_EPOCH)
                assert ckpt.step_boundary(state) is False
            ckpt.wait()
        assert faults.hits >= 1 and "could not write the checkpoint" in caplog.text
        assert [r.step for r in ckpt.store.committed()] == [1, 2, 3] and leftovers(save_dir) == []
        assert [e for e in read_events(save_dir) if e["event"] == "save_failed"]
        changed(ckpt)
        state.advance(BATCHES_PER_EPOCH)
        assert ckpt.step_boundary(state) is False
        ckpt.wait()
        assert ckpt.store.committed()[-1].step == state.global_step
    assert_still_verified(paths)


@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_an_emergency_save_on_a_full_disk_reraises_the_original_error(save_dir, monkeypatch, caplog, err):
    paths = make_run(save_dir)
    with checkpointer(save_dir) as ckpt:
        state = ckpt.resume()
        with monkeypatch.context() as patch:
            Faults(patch, "mkdir", named(lambda b, p: b == "emergency" or b.startswith(".tmp-")), err)
            with pytest.raises(RuntimeError, match="the training step failed"):
                with ckpt.emergency_guard(state):
                    raise RuntimeError("the training step failed")
    assert "emergency checkpoint failed" in caplog.text and leftovers(save_dir) == []
    assert_still_verified(paths)


def test_a_prune_that_fails_keeps_the_commit(save_dir, monkeypatch, caplog):
    paths = make_run(save_dir)
    with checkpointer(save_dir, keep_last=1, keep_best=False) as ckpt:
        with monkeypatch.context() as patch:
            Faults(patch, "rename", named(lambda b, p: b.startswith("step_")), "EIO")
            newest = ckpt.save(TrainState(global_step=4, batch_idx=4), "interval")
    assert "pruning failed" in caplog.text
    assert_still_verified([*paths, newest])


# ------------------------------------------------------------------------------------------- the event log
EVENT_FAULTS = {
    "ENOSPC at write": ("write", errno.ENOSPC),
    "EIO at write": ("write", errno.EIO),
    "ENOSPC at open": ("open", errno.ENOSPC),
    "EROFS at open": ("open", errno.EROFS),
}


@pytest.mark.parametrize("how", list(EVENT_FAULTS))
def test_a_failing_event_log_never_stops_training(save_dir, monkeypatch, caplog, how):
    call, code = EVENT_FAULTS[how]
    failures = []
    if call == "write":
        real_write = os.write

        def write(fd, data):
            if fd_path(fd).endswith("events.jsonl"):
                failures.append(fd)
                raise OSError(code, os.strerror(code))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
    else:
        real_open = os.open

        def failing_open(path, flags, *args, **kwargs):
            if os.fspath(path).endswith("events.jsonl"):
                failures.append(path)
                raise OSError(code, os.strerror(code))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", failing_open)
    with checkpointer(save_dir, every_steps=1) as ckpt:
        state = ckpt.resume()
        for _ in range(4):
            state.advance(BATCHES_PER_EPOCH)
            assert ckpt.step_boundary(state, metric=1.0) is False
        ckpt.save(state, "final")
    monkeypatch.undo()
    assert failures and [r.step for r in ckpt.store.committed()] == [1, 2, 3, 4]
    assert caplog.text.count("could not append") == 1  # warned once, not at every step


# -------------------------------------------------------------------------------------- a real full tmpfs
@pytest.mark.parametrize("full", ["blocks", "inodes"])
def test_on_a_real_full_filesystem_saves_fail_cleanly_and_training_goes_on(tmp_path, root_only, caplog, full):
    options = "size=1m" if full == "blocks" else "size=8m,nr_inodes=64"
    with tmpfs(tmp_path / "mnt", options) as mount:
        save_dir = mount / "run"
        with checkpointer(save_dir, every_steps=1) as ckpt:
            state = ckpt.resume()
            state.advance(BATCHES_PER_EPOCH)
            first = ckpt.save(state, "interval")
            filler = fill_blocks(mount) if full == "blocks" else fill_inodes(mount)
            for _ in range(3):
                state.advance(BATCHES_PER_EPOCH)
                assert ckpt.step_boundary(state, metric=1.0) is False
            assert "could not write the checkpoint" in caplog.text and "(ENOSPC)" in caplog.text
            assert verified(save_dir) == [first] and (save_dir / "latest").resolve() == first
            assert leftovers(save_dir) == []
            import shutil

            shutil.rmtree(filler) if filler.is_dir() else filler.unlink()
            state.advance(BATCHES_PER_EPOCH)
            assert ckpt.step_boundary(state, metric=1.0) is False
            assert ckpt.store.committed()[-1].step == state.global_step
        assert_still_verified(verified(save_dir))


TOOL = ["--duration", "2", "--epochs", "1", "--samples", "64", "--batch_size", "16", "--interval", "1000"]


@pytest.mark.slow
@pytest.mark.parametrize("full", ["blocks", "inodes, save dir exists", "inodes, new save dir"])
@pytest.mark.parametrize("entry", ["test tool", "main job"])
def test_a_run_started_on_a_full_disk_fails_in_one_line(tmp_path, root_only, full, entry):
    options = "size=1m" if full == "blocks" else "size=8m,nr_inodes=32"
    with tmpfs(tmp_path / "mnt", options) as mount:
        save_dir = mount / "run"
        if full != "inodes, new save dir":
            save_dir.mkdir()
        fill_blocks(mount) if full == "blocks" else fill_inodes(mount)
        if entry == "test tool":
            done = program("telepathy.test_preemption", "--save_dir", str(save_dir), *TOOL, timeout=120)
        else:
            done = program("telepathy.preemptible_training", "--save_dir", str(save_dir), "--max_restarts", "1",
                           "--restart_backoff", "0.1", "--", "python", "-m", "telepathy.test_preemption",
                           "--save_dir", str(save_dir), *TOOL, timeout=180)  # fmt: skip
    assert_no_traceback(done)
    assert done.code not in (0, 99), done.text[-2000:]
    last = [line for line in done.text.splitlines() if line.strip()][-1]
    assert "No space left" in done.text and ("space" in last or "ENOSPC" in last or "exit code" in last), last


@contextlib.contextmanager
def _signals():
    training_signals.install_signal_handlers()
    try:
        yield
    finally:
        training_signals.uninstall_signal_handlers()


def test_a_preemption_save_on_a_full_disk_still_stops_on_the_previous_checkpoint(save_dir, monkeypatch):
    paths = make_run(save_dir)
    with _signals(), checkpointer(save_dir) as ckpt:
        state = ckpt.resume()
        with monkeypatch.context() as patch:
            Faults(patch, "write", named(lambda b, p: b == "state.pt"), "ENOSPC")
            os.kill(os.getpid(), signal.SIGTERM)
            state.advance(BATCHES_PER_EPOCH)
            assert ckpt.step_boundary(state) is True
        assert training_signals.exit_code() in (98, 99)  # 98 since ad0c1ce: stopped, nothing new saved
    assert leftovers(save_dir) == [] and (save_dir / "latest").resolve() == paths[-1]
    assert_still_verified(paths)
