"""A module's state dict carries ``_metadata``: each submodule's ``_version``, which ``load_state_dict`` hands to
its ``_load_from_state_dict``. A copy that drops it makes a module believe its state comes from an old version and
convert it: a quantization observer resets its ``eps`` to float32's. Async, differential and compressed saves
and the per-step snapshot used to drop it; every path must keep it, so the resumed module is the saved one."""

from __future__ import annotations

import pytest
import torch
from harness import SAVE_MODES
from torch import nn
from torch.ao.quantization import MovingAverageMinMaxObserver

from telepathy import tree
from telepathy.checkpointer import Checkpointer
from telepathy.disk import slots
from telepathy.store.snapshot_format import describe, rebuild
from telepathy.store.snapshot_read import files_from_slot
from telepathy.store.step_snapshots import StepSnapshots
from telepathy.train_state import TrainState

MODES = SAVE_MODES


def model() -> nn.Module:
    observed = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    observed.observer = MovingAverageMinMaxObserver(eps=1e-5)  # _version 3; version None resets eps
    observed.observer(torch.arange(6.0))
    return observed


def loaded_into_fresh(state_dict) -> nn.Module:
    fresh = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    fresh.observer = MovingAverageMinMaxObserver(eps=0.5)
    fresh.load_state_dict(state_dict)
    return fresh


def test_the_observer_really_depends_on_the_versions():
    """The negative control: without _metadata the observer's eps is converted (else the tests prove nothing)."""
    plain = dict(model().state_dict())
    assert loaded_into_fresh(plain).observer.eps.item() != pytest.approx(1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_every_save_mode_resumes_a_module_with_its_versions(tmp_path, mode):
    saved = model()
    with Checkpointer(tmp_path, parts={"model": saved}, **MODES[mode]) as ckpt:
        ckpt.save(TrainState(global_step=1), "test", blocking=not MODES[mode].get("async_save"))
    resumed = loaded_into_fresh(model().state_dict())  # anything but the saved state
    resumed.observer.eps.fill_(0.5)
    with Checkpointer(tmp_path, parts={"model": resumed}, **MODES[mode]) as ckpt:
        assert ckpt.resume() is not None
    assert resumed.observer.eps.item() == pytest.approx(1e-5), "the observer's state was converted as if old"


def test_a_per_step_snapshot_keeps_the_versions(tmp_path):
    saved = model()
    structure, tensors, constants = describe({"model": saved.state_dict(keep_vars=True)})
    back = rebuild(structure, tensors, constants)["model"]
    assert back._metadata == saved.state_dict()._metadata
    snapshots = StepSnapshots(tmp_path)
    try:
        snapshots.capture(1, {"model": saved.state_dict(keep_vars=True)}, {"reason": "rescue"}, {})
        files = files_from_slot(*slots.read_newest(tmp_path))
    finally:
        snapshots.close()
    assert tree.module_versions(files["model"]) == saved.state_dict()._metadata
    assert loaded_into_fresh(files["model"]).observer.eps.item() == pytest.approx(1e-5)
