"""Fixtures of the adversarial suite: the save dir under attack, an ``outside`` sibling whose every entry must stay
as it was, and a run with three committed checkpoints."""

from __future__ import annotations

import pytest
from adversary import can_mount, make_outside, make_run, verified


@pytest.fixture
def save_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def outside(tmp_path, save_dir):
    """A sibling of the save dir with weights, a checkpoint and notes of its own; ``outside.assert_unchanged()``."""
    found = make_outside(tmp_path, save_dir)
    found.seal()
    return found


@pytest.fixture
def run3(save_dir):
    """A save dir with three committed checkpoints (steps 1, 2, 3); returns their paths, all verified."""
    paths = make_run(save_dir)
    assert verified(save_dir) == paths
    return paths


@pytest.fixture
def root_only():
    if not can_mount():
        pytest.skip("needs root to mount a filesystem")
