"""Per-step snapshots in shared-memory slots: the state described and rebuilt exactly (plain values keep their
types), and the trainer's cached views of a slot stay correct when the state changes layout or grows."""

from __future__ import annotations

import random

import torch
from harness import deep_equal

from telepathy import rng
from telepathy.disk import slots
from telepathy.store.step_snapshots import StepSnapshots, describe, files_from_slot, rebuild


def test_describe_and_rebuild_keep_every_value_and_its_type():
    random.seed(3)
    files = {
        "state": {"rng": rng.capture_rng_state(), "step": 7, "loss": 0.25, "name": "x", "none": None},
        "lists": {
            "bools": [True, False] * 20,
            "floats": [1.0] * 40,
            "ints": list(range(40)),
            "huge": [2**70] * 40,
            "mixed": [1, True] * 20,
        },  # fmt: skip
        "tuples": (1, (2.0, "three"), [torch.ones(2)]),
        "int keys": {0: torch.zeros(3), 1: {"exp_avg": torch.arange(4.0)}},
    }
    structure, tensors = describe(files)
    back = rebuild(structure, tensors)
    assert deep_equal(back, files) == []
    for key, value in files["lists"].items():
        assert [type(v) for v in back["lists"][key]] == [type(v) for v in value], key
    assert type(back["tuples"]) is tuple and type(back["tuples"][1]) is tuple


def test_a_slot_rebuilt_after_the_state_changed_layout_and_grew(tmp_path):
    snapshots = StepSnapshots(tmp_path)
    try:
        for step, size in enumerate([4, 4, 4, 4, 1000, 1000, 3, 3], start=1):
            files = {"model": {"w": torch.full((size,), float(step)), "b": torch.arange(step, dtype=torch.int64)}}
            snapshots.capture(step, files, {"reason": "rescue"}, {})
            meta, data = slots.read_newest(tmp_path)
            assert meta["step"] == step
            assert deep_equal(files_from_slot(meta, data), files) == [], f"step {step}"
    finally:
        snapshots.close()
    assert not snapshots._views, "views of closed mappings were kept"
