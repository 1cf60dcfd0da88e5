"""Disk full and I/O errors during a save: on a real size-limited tmpfs (ENOSPC) and with EIO/EACCES injected
at fsync and write. The previous checkpoint stays intact and latest, temporary files are removed, the error
says what was needed, and the loop continues (or, when a preemption asked for the save, exits on the previous
checkpoint)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess

import pytest
import torch
from torch import nn

from telepathy import training_signals
from telepathy.checkpointer import Checkpointer
from telepathy.disk.manifest import verify_directory
from telepathy.store.checkpoint_store import CheckpointWriteError
from telepathy.train_state import TrainState


def make_checkpointer(save_dir):
    model = nn.Linear(256, 256)  # ~0.25 MiB of weights, ~0.5 MiB of AdamW state once stepped
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    return Checkpointer(save_dir, parts={"model": model}, optimizer=optimizer)


def leftovers(save_dir):
    return [p.name for p in (save_dir / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB filesystem (tmpfs; needs root)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a size-limited tmpfs needs root (and CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: the save-dir lock file may be open


def fill(mount, leave_bytes: int):
    filler = mount / "filler"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def test_disk_full_keeps_the_previous_checkpoint_and_training_goes_on(small_fs, caplog):
    save_dir = small_fs / "run"
    ckpt = make_checkpointer(save_dir)
    state = TrainState(global_step=1)
    first = ckpt.save(state, "interval")
    filler = fill(small_fs, leave_bytes=200_000)
    training_signals.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGUSR1)  # a manual save request, into a full disk
    state.global_step = 2
    with caplog.at_level(logging.ERROR, logger="telepathy"):
        assert ckpt.step_boundary(state) is False  # no exception, training goes on
    message = caplog.text
    assert "could not write the checkpoint for step 2" in message and "No space left on device (ENOSPC)" in message
    assert "it needs about 0.8 MiB" in message and f"previous checkpoint {first} is intact and still latest" in message
    assert "Training continues" in message
    assert ckpt.store.latest_pointer() == first and verify_directory(first) and leftovers(save_dir) == []
    # Space again: the next save works.
    filler.unlink()
    os.kill(os.getpid(), signal.SIGUSR1)
    state.global_step = 3
    assert ckpt.step_boundary(state) is False
    assert ckpt.store.latest_pointer().name == "step_00000003"


def test_disk_full_during_a_preemption_save_exits_on_the_previous_checkpoint(small_fs, caplog):
    save_dir = small_fs / "run"
    ckpt = make_checkpointer(save_dir)
    first = ckpt.save(TrainState(global_step=1), "interval")
    fill(small_fs, leave_bytes=200_000)
    training_signals.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    with caplog.at_level(logging.ERROR, logger="telepathy"):
        assert ckpt.step_boundary(TrainState(global_step=2)) is True  # still exits
    assert training_signals.exit_code() == 98  # nothing new saved for this stop (issue 14): not 99
    assert "Exiting with code 98 (nothing new saved): the next run resumes from the previous checkpoint" in caplog.text
    assert ckpt.store.newest_valid()[0].path == first == ckpt.store.latest_pointer() and leftovers(save_dir) == []


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_io_errors_at_fsync_or_write_leave_nothing_behind(tmp_path, monkeypatch, where):
    ckpt = make_checkpointer(tmp_path)
    first = ckpt.save(TrainState(global_step=1), "interval")
    if where == "fsync":
        real_fsync = os.fsync

        def failing_fsync(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", failing_fsync)
        expected = "(EIO)"
    else:
        real_save, calls = torch.save, []

        def failing_save(obj, f, *args, **kwargs):  # the second file of the checkpoint cannot be written
            calls.append(1)
            if len(calls) == 2:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", failing_save)
        expected = "(EACCES)"
    with pytest.raises(CheckpointWriteError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ckpt.save(TrainState(global_step=2), "interval")
    monkeypatch.undo()
    if where == "fsync":
        assert os.fsync is real_fsync
    assert ckpt.store.latest_pointer() == first and leftovers(tmp_path) == []
    assert [r.step for r in ckpt.store.committed()] == [1]
