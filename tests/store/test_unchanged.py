"""The cheap checks a per-step snapshot uses to skip work: each must see every change that matters, and where
torch's private helpers are missing the callers must fall back to the full work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from telepathy.unchanged import PlainTree, TensorLayouts, dict_version


def test_dict_version_tags_change_with_every_change():
    version = dict_version()
    assert version is not None, "torch's dict_version is expected on this machine's torch and Python"
    d = {"a": 1}
    before = version(d)
    d["a"] = 2
    assert version(d) != before
    d["a"] = 2  # (the same object again: nothing changed)
    unchanged = version(d)
    assert version(d) == unchanged


CHANGES = {
    "a value replaced": lambda s, m: s.__setitem__("lr", 0.2),
    "an equal value of another type": lambda s, m: s.__setitem__("batch", 8.0),
    "a list grown": lambda s, m: m["argv"].append("--x"),
    "a list item replaced": lambda s, m: m["argv"].__setitem__(0, "other"),
    "a nested dict changed": lambda s, m: m["args"].__setitem__("seed", 2),
    "a dict in a list changed": lambda s, m: m["groups"][0].__setitem__("k", 1),
    "a key removed": lambda s, m: s.pop("lr"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_plain_tree_sees_every_change(change):
    signature = {"batch": 8, "lr": 0.1}
    metadata = {"argv": ["train.py"], "args": {"seed": 1}, "groups": [{"k": 0}], "pair": (1, "a")}
    seen = PlainTree.of(signature, metadata)
    assert seen is not None and seen.holds(signature, metadata)
    CHANGES[change](signature, metadata)
    assert not seen.holds(signature, metadata)


def test_a_plain_tree_is_not_made_for_what_can_change_unseen():
    assert PlainTree.of({"a": np.arange(3)}) is None  # an array changed in place keeps its identity
    assert PlainTree.of({"a": torch.ones(1)}) is None
    cycle: list = []
    cycle.append(cycle)
    assert PlainTree.of({"a": cycle}) is None
    seen = PlainTree.of({"a": 1}, {})
    assert not seen.holds({"a": 1}, {}), "other objects (even equal ones) are not the ones seen"


def test_tensor_layouts_see_shape_stride_dtype_and_sparse_changes():
    tensors = [torch.zeros(2, 3), torch.zeros(4), torch.nn.Parameter(torch.zeros(3, 3))]
    layouts = TensorLayouts(tensors)
    assert layouts.same(tensors)
    with torch.no_grad():
        tensors[2].t_()
    assert not layouts.same(tensors), "strides changed"
    for changed in (
        [torch.zeros(3, 2), *tensors[1:]],
        [tensors[0], torch.zeros(4, dtype=torch.float64), tensors[2]],
        [tensors[0], torch.zeros(4).to_sparse(), tensors[2]],
        tensors[:2],
    ):
        assert not TensorLayouts(tensors).same(changed)
