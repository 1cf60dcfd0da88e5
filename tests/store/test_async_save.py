"""Async saves: the loop blocks only for the snapshot; ``latest`` moves only after the background commit; a
save before an exit is durable; never two saves at once."""

from __future__ import annotations

import os
import signal
import threading

import torch
from torch import nn

from telepathy import training_signals
from telepathy.checkpointer import Checkpointer
from telepathy.store.snapshot import HostBuffers
from telepathy.train_state import TrainState


def test_snapshot_copies_into_reused_buffers():
    buffers = HostBuffers()
    state = {"w": torch.arange(6.0).reshape(2, 3), "meta": [1, "x", (2, 3)], "none": None}
    first = buffers.snapshot(state)
    assert torch.equal(first["w"], state["w"]) and first["w"].data_ptr() != state["w"].data_ptr()
    assert first["meta"] == [1, "x", (2, 3)] and buffers.nbytes == 24
    state["w"].add_(1)  # training goes on: the snapshot must not change
    assert torch.equal(first["w"], torch.arange(6.0).reshape(2, 3))
    second = buffers.snapshot(state)
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], state["w"])  # reused


def test_latest_moves_only_after_the_background_commit(tmp_path):
    model = nn.Linear(8, 8)
    reports = []
    ckpt = Checkpointer(tmp_path, parts={"model": model}, async_save=True, on_save=reports.append)
    first = ckpt.save(TrainState(global_step=1), "interval")
    gate, real_save = threading.Event(), ckpt.store.save

    def slow_save(*args, **kwargs):
        gate.wait(timeout=30)
        return real_save(*args, **kwargs)

    ckpt.store.save = slow_save
    training_signals.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGUSR1)
    expected = model.weight.detach().clone()
    assert ckpt.step_boundary(TrainState(global_step=2)) is False  # returned while the write is held
    with torch.no_grad():
        model.weight.add_(1.0)  # the loop mutates the model during the background write
    assert ckpt.store.latest_pointer() == first
    gate.set()
    ckpt.wait()
    latest = ckpt.store.latest_pointer()
    assert latest.name == "step_00000002" and reports[-1].step == 2 and reports[-1].blocked_seconds is not None
    assert torch.equal(torch.load(latest / "model.pt", weights_only=True)["weight"], expected)  # the snapshot
    ckpt.close()


def test_a_save_before_an_exit_is_durable_when_step_boundary_returns(tmp_path):
    ckpt = Checkpointer(tmp_path, parts={"model": nn.Linear(2, 2)}, async_save=True)
    training_signals.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGUSR1)
    ckpt.step_boundary(TrainState(global_step=1))  # async, in flight
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.step_boundary(TrainState(global_step=2)) is True
    assert ckpt._writer is None and ckpt.store.latest_pointer().name == "step_00000002"
    assert [r.step for r in ckpt.store.committed()] == [1, 2]
    ckpt.close()
