"""Fixtures of the adversarial suite: the save dir under attack, an ``outside`` sibling whose every entry must stay
as it was, and a run with three committed checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adversary import can_mount, diff_snapshots, make_outside, make_run, snapshot, verified


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


@pytest.fixture(autouse=True)
def neighbour(tmp_path):
    """Every case: a sibling of the save dir that looks like telepathy's own (a checkpoint with a manifest, blobs,
    latest, an event log) must be exactly as it was afterwards, whatever the library did to the save dir."""
    root = tmp_path / "neighbour"
    step = root / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "model.pt").write_bytes(b"weights of another run")
    (step / "manifest.json").write_text(json.dumps({"format": "telepathy-checkpoint", "files": {}}))
    (root / "blobs" / "ab").mkdir(parents=True)
    (root / "blobs" / "ab" / ("ab" + "0" * 30 + ".raw")).write_bytes(b"blob")
    (root / "events.jsonl").write_text('{"time": 1, "event": "start"}\n')
    (root / "latest").symlink_to("checkpoints/step_00000001")
    before = snapshot(root)
    yield root
    changes = diff_snapshots(before, snapshot(root))
    assert not changes, "a neighbouring directory was changed: " + "; ".join(changes[:10])


KNOWN = Path(__file__).with_name("known_failures.txt")


def pytest_collection_modifyitems(config, items):
    """Cases listed in known_failures.txt are open defects of issue 15, each named there with its cause: they run
    and are reported as xfail (XPASS once fixed: then take the line out)."""
    for item in items:  # the whole suite is minutes: out of the fast run (`-m "not slow"`), always in CI's
        if item.nodeid.startswith("tests/adversarial/"):
            item.add_marker(pytest.mark.slow)
    if not KNOWN.exists():
        return
    listed = {line.split("  #")[0].strip() for line in KNOWN.read_text().splitlines() if line.strip()}
    listed.discard("")
    for item in items:
        if item.nodeid.split("tests/adversarial/")[-1] in listed:
            item.add_marker(pytest.mark.xfail(reason="issue 15: an open defect listed in known_failures.txt"))
