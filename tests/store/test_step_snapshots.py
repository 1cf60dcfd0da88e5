"""Per-step snapshots in shared-memory slots: the state described and rebuilt exactly (plain values keep their
types), and the trainer's cached views of a slot stay correct when the state changes layout or grows."""

from __future__ import annotations

import random

import pytest
import torch
from harness import deep_equal

from telepathy import rng, tree
from telepathy.disk import slots
from telepathy.store.snapshot_format import describe, rebuild
from telepathy.store.snapshot_read import files_from_slot
from telepathy.store.step_snapshots import StepSnapshots


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
    back = rebuild(*describe(files))
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


def _adamw_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def test_an_optimizers_per_parameter_state_is_one_node_and_comes_back_exactly():
    files = _adamw_state()
    structure, tensors, keysets = describe(files)
    assert list(structure["optimizer"]["state"]) == ["__TT__"], "the per-parameter state was not described as a table"
    assert list(structure["model"]["__V__"][1]) == ["__TS__"]  # (a state dict with its module versions)
    assert len(tensors) == 4 + 4 * 3  # the weights, then (step, exp_avg, exp_avg_sq) per parameter
    assert deep_equal(rebuild(structure, tensors, keysets), files) == []


def test_irregular_dicts_are_described_entry_by_entry_and_keep_their_types():
    files = {
        "rows with different keys": {0: {"momentum_buffer": torch.ones(2)}, 1: {"exp_avg": torch.zeros(3)}},
        "a plain value in a row": {0: {"step": 3, "exp_avg": torch.ones(2)}, 1: {"step": 4, "exp_avg": torch.ones(1)}},
        "marker-like keys": {"__T__": torch.ones(1), "__TS__": 5, "__L__": [1] * 40},
        "table with marker-like columns": {0: {"__T__": torch.ones(1)}, 1: {"__T__": torch.zeros(1)}},
        "tuple keys": {(1, "a"): torch.ones(1), (2, "b"): torch.zeros(1)},
        "plain": {"ints": [-(2**40)] * 40, "short": [1, 2.0, True, None, "x"], "empty": {}, "args": {"lr": 0.1}},
    }  # fmt: skip
    back = rebuild(*describe(files))
    assert deep_equal(back, files) == []
    assert type(back["a plain value in a row"][0]["step"]) is int
    assert [type(v) for v in back["plain"]["short"]] == [int, float, bool, type(None), str]


def test_a_tensor_a_slot_cannot_hold_is_named_when_it_appears_after_the_first_steps(tmp_path, caplog):
    files = _adamw_state()
    snapshots = StepSnapshots(tmp_path)
    try:
        snapshots.capture(1, files, {"reason": "rescue"}, {})
        assert snapshots.disabled is None
        files["optimizer"]["state"][1]["exp_avg"] = files["optimizer"]["state"][1]["exp_avg"].to_sparse()
        snapshots.capture(2, files, {"reason": "rescue"}, {})
        assert snapshots.disabled is not None and "state/1/exp_avg" in snapshots.disabled, snapshots.disabled
        assert "per-step snapshots are off" in caplog.text
        assert slots.read_newest(tmp_path)[0]["step"] == 1, "the last good snapshot was replaced"
    finally:
        snapshots.close()


def test_a_tensor_resized_in_place_is_copied_with_its_new_shape(tmp_path):
    weight = torch.arange(6.0)
    files = {"model": {"w": weight}}
    snapshots = StepSnapshots(tmp_path)
    try:
        snapshots.capture(1, files, {"reason": "rescue"}, {})
        with torch.no_grad():
            weight.resize_(2, 5).copy_(torch.arange(10.0).view(2, 5))  # the same tensor object, a new shape
        snapshots.capture(2, files, {"reason": "rescue"}, {})
        meta, data = slots.read_newest(tmp_path)
        assert torch.equal(files_from_slot(meta, data)["model"]["w"], torch.arange(10.0).view(2, 5))
    finally:
        snapshots.close()


def test_keys_keep_their_types_through_a_slot_even_when_equal_keys_of_another_type_came_first(tmp_path):
    """From a review: key sets were shared by equality, so {0.0: ...} and {False: ...} came back with the int keys
    of an earlier {0: ...}; and a str-Enum key was taken for a plain str once a plain one had been seen."""
    import enum

    class Color(str, enum.Enum):
        RED = "red"

    row = {"exp_avg": torch.ones(1)}
    files = {
        "ints": {0: dict(row), 1: dict(row)},
        "floats": {0.0: dict(row), 1.0: dict(row)},
        "bools": {False: dict(row), True: dict(row)},
        "plain": {"red": 1},
    }
    snapshots = StepSnapshots(tmp_path)
    try:
        snapshots.capture(1, files, {"reason": "rescue"}, {})
        back = files_from_slot(*slots.read_newest(tmp_path))
        assert deep_equal(back, files) == []
        for name, kind in (("ints", int), ("floats", float), ("bools", bool)):
            assert [type(k) for k in back[name]] == [kind, kind], name
        snapshots.capture(2, {**files, "enum": {Color.RED: 2}}, {"reason": "rescue"}, {})
        assert snapshots.disabled is not None, "an Enum key was written as a plain str"
        assert slots.read_newest(tmp_path)[0]["step"] == 1
    finally:
        snapshots.close()


def test_pythons_rng_state_packed_for_a_snapshot_comes_back_as_the_list_a_save_writes(tmp_path):
    """The per-step snapshot takes Python's RNG state packed (converted only when it changed): each step's slot
    must still hold that step's state, as the list of ints a normal save writes."""
    random.seed(11)
    snapshots = StepSnapshots(tmp_path)
    try:
        for step in range(1, 6):
            if step in (3, 4):
                random.random()  # the state moves at steps 3 and 4 only
            packed = rng.capture_rng_state(packed=True)
            assert type(packed["python"]["internal"]) is rng.PackedInts
            snapshots.capture(step, {"state": {"rng": packed}}, {"reason": "rescue"}, {})
            back = files_from_slot(*slots.read_newest(tmp_path))["state"]["rng"]
            expected = rng.capture_rng_state()
            assert deep_equal(back, expected) == [], f"step {step}"
            assert type(back["python"]["internal"]) is list
            assert {type(v) for v in back["python"]["internal"]} == {int}
            assert rng.rng_states_equal(back, expected)
    finally:
        snapshots.close()
    again = rng.capture_rng_state(packed=True)["python"]["internal"]
    assert again.tensor is packed["python"]["internal"].tensor, "an unchanged state was packed again"


def test_a_fixed_value_is_described_once_and_a_new_one_replaces_it(tmp_path):
    """A run's signature and metadata reach the snapshot as tree.Fixed: described once per object, in the slot's
    layout; a new object (the value changed) is what the next slot holds."""
    snapshots = StepSnapshots(tmp_path)
    first = tree.Fixed({"args": {"lr": 0.5, "betas": (0.9, 0.99)}, "argv": ["a", "b"], "n": None})
    second = tree.Fixed({"args": {"lr": 0.25}, "argv": [], "n": 1})
    try:
        for step, fixed in enumerate([first, first, first, second, second], start=1):
            files = {"model": {"w": torch.full((3,), float(step))}, "state": {"metadata": fixed, "step": step}}
            snapshots.capture(step, files, {"reason": "rescue"}, {})
            back = files_from_slot(*slots.read_newest(tmp_path))
            assert deep_equal(back["state"]["metadata"], fixed.value) == [], f"step {step}"
            assert type(back["state"]["metadata"]["args"].get("betas", ())) is tuple
            assert back["state"]["step"] == step
            assert back["model"]["w"].tolist() == [float(step)] * 3
        assert len(snapshots._fixed) == 2
    finally:
        snapshots.close()
    # One that holds tensors (someone put one in the metadata) is described in place; long int lists stay lists.
    holding = {"w": torch.ones(2), "rows": {"a": {"t": torch.zeros(1)}}, "ids": list(range(40))}
    structure, tensors, constants = describe({"state": {"metadata": tree.Fixed(holding)}}, fixed_cache={})
    assert len(tensors) == 3 and deep_equal(rebuild(structure, tensors, constants)["state"]["metadata"], holding) == []
    structure, tensors, constants = describe({"m": tree.Fixed({"ids": list(range(40))})}, fixed_cache={})
    assert tensors == [] and rebuild(structure, tensors, constants)["m"] == {"ids": list(range(40))}


def test_the_layout_is_written_into_a_slot_only_when_it_changed(tmp_path, monkeypatch):
    written = []
    original = slots.SlotWriter.write

    def spy(self, step, meta, data_len, fill, layout=b"{}", before_moving=None):
        before = dict(self._layout_in)
        original(self, step, meta, data_len, fill, layout, before_moving)
        written.append(before.get(step % 2, (None,))[0] is not self._layout_in[step % 2][0])

    monkeypatch.setattr(slots.SlotWriter, "write", spy)
    snapshots = StepSnapshots(tmp_path)
    try:
        for step, size in enumerate([4, 4, 4, 4, 9, 9, 9], start=1):
            files = {"model": {"w": torch.full((size,), float(step))}}
            snapshots.capture(step, files, {"reason": "rescue"}, {})
            meta, data = slots.read_newest(tmp_path)
            assert deep_equal(files_from_slot(meta, data), files) == [], f"step {step}"
    finally:
        snapshots.close()
    # each slot gets the first layout once, then the second once
    assert written == [True, True, False, False, True, True, False]


def test_a_slot_whose_meta_and_layout_share_a_key_is_not_read(tmp_path):
    snapshots = StepSnapshots(tmp_path)
    try:
        snapshots.capture(1, {"model": {"w": torch.ones(2)}}, {"reason": "rescue"}, {})
        path = tmp_path / "slot1"
        raw = bytearray(path.read_bytes())
        header = list(slots.HEADER.unpack_from(raw, 0))
        layout_len, meta_at = header[6], header[7]
        layout = raw[64 : 64 + layout_len]
        assert layout.startswith(b'{"tensors"')
        raw[64 : 64 + layout_len + 9] = b'{"step":7,' + layout[1:]  # a second "step", in the layout
        header[6] = layout_len + 9
        slots.HEADER.pack_into(raw, 0, *header)
        assert 64 + header[6] <= meta_at
        path.write_bytes(bytes(raw))
        assert slots.read_newest(tmp_path) is None
    finally:
        snapshots.close()


def _checkpointer_with_slots(tmp_path, monkeypatch, model=None, **kwargs):
    from telepathy.checkpointer import Checkpointer
    from telepathy.options import CheckpointOptions
    from telepathy.store import step_snapshots

    slot_dir = slots.make_slot_dir(tmp_path)
    monkeypatch.setenv(slots.SLOT_DIR_ENV, str(slot_dir))
    monkeypatch.setattr(step_snapshots, "_inherited", None)
    ckpt = Checkpointer(tmp_path / "save", parts={"model": model or torch.nn.Linear(2, 2)},
                        options=CheckpointOptions(snapshot_every_step=True), **kwargs)  # fmt: skip
    assert ckpt._snapshots is not None
    return ckpt, slot_dir


CHANGES = {  # step -> a change to the signature or metadata a snapshot must carry exactly (== would miss most)
    2: lambda c: c.signature["names"].append("b"),  # deep, in place
    3: lambda c: c.signature.__setitem__("scale", 1.0),  # was 1: equal, another type
    4: lambda c: c.signature.__setitem__("scale", True),
    5: lambda c: c.metadata["args"].__setitem__("lr", -0.0),  # was 0.0
    6: lambda c: setattr(c, "signature", dict(reversed(list(c.signature.items())))),  # another key order
    7: lambda c: c.signature.__setitem__("tup", [1.0]),  # was (1,): a new Fixed whose description is == the old
    8: lambda c: c.metadata.__setitem__("big", list(range(40))),  # a long int list (no tensor in a fixed value)
    9: lambda c: c.metadata.__setitem__("t", torch.tensor([1.5, 2.5])),  # a tensor: described in place
    10: lambda c: c.signature.__setitem__("array", __import__("numpy").arange(3.0)),  # == raises on an array
}


def test_a_checkpointers_signature_and_metadata_changes_reach_the_next_snapshot_exactly(tmp_path, monkeypatch):
    """The Checkpointer hands them over as tree.Fixed values it makes again only when they change: every change
    (in place, deep, to an equal value of another type, to another key order) must be in the next step's slot
    exactly as a save at that step would write it, and none may crash the trainer or turn snapshots off."""
    from telepathy.disk.contents import STATE
    from telepathy.train_state import TrainState

    signature = {"batch": 8, "names": ["a"], "scale": 1, "tup": (1,)}
    ckpt, slot_dir = _checkpointer_with_slots(tmp_path, monkeypatch, args={"lr": 0.0}, signature=signature)
    try:
        state = TrainState()
        for step in range(1, 12):
            state.global_step = step
            if step in CHANGES:
                CHANGES[step](ckpt)
            ckpt.step_boundary(state)
            assert ckpt._snapshots.disabled is None, ckpt._snapshots.disabled
            rescued = files_from_slot(*slots.read_newest(slot_dir))[STATE]
            saved = ckpt._files(state)[STATE]
            for entry in ("signature", "metadata"):
                assert repr(rescued[entry]) == repr(saved[entry]), (step, entry)
            assert rescued["global_step"] == step
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


class _Scaled(torch.nn.Linear):
    pass


def _tree() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), _Scaled(4, 2))
    model[1].register_buffer("count", torch.zeros(()))
    return model


def _patch_class(c, model):  # a class patched during the run: its instances' state dicts change
    _Scaled._version = 7


MODULE_CHANGES = {  # step -> a change the next snapshot must carry exactly as a save at that step writes it
    2: lambda c, m: setattr(m[0], "weight", torch.nn.Parameter(torch.full((4, 3), 2.0))),
    3: lambda c, m: m[0]._parameters.__setitem__("bias", torch.nn.Parameter(torch.ones(4))),  # no __setattr__
    4: lambda c, m: m[1].register_buffer("extra", torch.arange(3.0)),
    5: lambda c, m: m[1]._non_persistent_buffers_set.add("extra"),  # a set, not a dict: in place
    6: lambda c, m: m.add_module("tail", torch.nn.Linear(2, 2)),
    7: lambda c, m: m[2].register_state_dict_pre_hook(lambda *a: None),
    8: lambda c, m: m[2]._state_dict_pre_hooks.clear(),
    9: _patch_class,
    10: lambda c, m: m[0].weight.data.resize_(2, 6).fill_(3.0),  # the same tensor object, another shape
    11: lambda c, m: m[0].weight.t_(),  # another stride order, the same shape count
    12: lambda c, m: setattr(m[0].bias, "data", torch.full((4,), 5.0, dtype=torch.float64)),  # another dtype
    13: lambda c, m: setattr(m[0].bias, "data", torch.full((4,), 6.0, dtype=torch.float64)),  # new storage
    14: lambda c, m: delattr(m, "tail"),
    15: lambda c, m: m[2].weight.requires_grad_(False),
    16: lambda c, m: setattr(m[2], "state_dict", lambda *a, **k: {"own": torch.ones(1)}),  # on the instance
    17: lambda c, m: m[2].__dict__.pop("state_dict"),
}


@pytest.mark.parametrize("helpers", ["torch's", "none"])
def test_changes_to_a_module_tree_reach_the_next_snapshot_exactly(tmp_path, monkeypatch, helpers):
    """The trainer keeps a part's state dict and its tensors' layout between steps while nothing changed (dict
    version tags, one C call over the tensors): every change to the tree, to a tensor's shape, strides or
    dtype, and every override must still be in the next step's slot exactly as a save at that step writes it."""
    from telepathy.train_state import TrainState

    monkeypatch.setattr(_Scaled, "_version", 1, raising=False)
    if helpers == "none":  # (torch without dict version tags or TensorGuards: the full work at every step)
        from telepathy import module_state, unchanged

        monkeypatch.setattr(module_state, "dict_version", lambda: None)
        monkeypatch.setattr(unchanged.TensorLayouts, "same", lambda self, tensors: False)
    model = _tree()
    ckpt, slot_dir = _checkpointer_with_slots(tmp_path, monkeypatch, model=model)
    try:
        state = TrainState()
        for step in range(1, 19):
            state.global_step = step
            with torch.no_grad():
                if step in MODULE_CHANGES:
                    MODULE_CHANGES[step](ckpt, model)
                for p in model.parameters():
                    p.add_(0.25)  # a new value at every step
            ckpt.step_boundary(state)
            assert ckpt._snapshots.disabled is None, ckpt._snapshots.disabled
            rescued = files_from_slot(*slots.read_newest(slot_dir))["model"]
            saved = ckpt._files(state)["model"]
            assert list(rescued) == list(saved), step
            for key, value in saved.items():
                assert value.dtype == rescued[key].dtype and value.shape == rescued[key].shape, (step, key)
                assert torch.equal(value, rescued[key]), (step, key)
            assert getattr(rescued, "_metadata", None) == getattr(saved, "_metadata", None), step
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


TABLE_CHANGES = {  # step -> a change to an optimizer's per-parameter state the next snapshot must carry
    3: lambda state: state[0].__setitem__("exp_avg", torch.full((2, 2), 7.0)),  # a moment replaced
    4: lambda state: state.__setitem__(2, {k: v.clone() for k, v in state[0].items()}),  # a new row
    5: lambda state: state[1].__setitem__("max_exp_avg_sq", torch.zeros(2, 2)),  # rows of other keys: not a table
    6: lambda state: state[1].pop("max_exp_avg_sq"),  # a table again
    7: lambda state: state[0]["exp_avg"].resize_(4),  # the same tensor, another shape
    8: lambda state: state.pop(2),
}


def test_changes_to_an_optimizers_state_reach_the_next_snapshot_exactly(tmp_path):
    """Dicts of tensors kept between steps are described from what the snapshot remembers while their version
    tags (and their rows') hold: every change must still reach the next step's slot exactly."""
    state = {
        i: {"step": torch.tensor(1.0), "exp_avg": torch.ones(2, 2), "exp_avg_sq": torch.ones(2, 2)} for i in (0, 1)
    }
    files = {"optimizer": {"optimizer": {"state": state, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}}
    snapshots = StepSnapshots(tmp_path)
    try:
        for step in range(1, 10):
            with torch.no_grad():
                if step in TABLE_CHANGES:
                    TABLE_CHANGES[step](state)
                for row in state.values():
                    for value in row.values():
                        value.add_(1.0)  # a new value at every step, in place
            snapshots.capture(step, files, {"reason": "rescue"}, {})
            assert snapshots.disabled is None, snapshots.disabled
            meta, data = slots.read_newest(tmp_path)
            assert meta["step"] == step
            assert deep_equal(files_from_slot(meta, data), files) == [], step
    finally:
        snapshots.close()


def test_module_versions_changed_in_place_reach_the_next_snapshot(tmp_path):
    """A part whose own state_dict hands back the same OrderedDict and changes its _metadata in place."""
    from collections import OrderedDict

    held = OrderedDict(w=torch.ones(2))
    held._metadata = OrderedDict({"": {"version": 1}})
    files = {"o": held}
    snapshots = StepSnapshots(tmp_path)
    try:
        for step, version in enumerate([1, 1, 2, 2.0, True, 3], start=1):
            held._metadata[""]["version"] = version
            snapshots.capture(step, files, {"reason": "rescue"}, {})
            rescued = files_from_slot(*slots.read_newest(tmp_path))["o"]
            assert repr(rescued._metadata) == repr(held._metadata), step
    finally:
        snapshots.close()
