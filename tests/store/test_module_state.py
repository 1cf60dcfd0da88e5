"""live_state_dict gives exactly module.state_dict(keep_vars=True): same keys in the same order, the tensors
themselves, the same _metadata; and where a module customises its state dict, it is that module's own."""

from __future__ import annotations

import functools
from collections import OrderedDict

import pytest
import torch
from torch import nn

from telepathy.latentwire.model import Adapter, ByteEncoder
from telepathy.module_state import LiveOptimizerState, LiveStateDicts, live_state_dict


def same(module: nn.Module) -> None:
    got, want = live_state_dict(module), module.state_dict(keep_vars=True)
    assert list(got) == list(want)
    assert all(got[k] is want[k] for k in want)  # the parameters and buffers themselves, not copies
    assert list(got._metadata.items()) == list(want._metadata.items())


def odd_tree() -> nn.Module:
    shared = nn.Linear(2, 2)
    tree = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),  # buffers, version 2
        nn.Sequential(nn.Conv1d(2, 2, 3), nn.LayerNorm(2), nn.Identity()),
        nn.ModuleDict({"b": nn.Embedding(5, 3), "a": shared}),
        shared,  # the same module twice: twice in the state dict, as state_dict does
    )
    tree[0].register_parameter("absent", None)
    tree[1].register_buffer("scratch", torch.ones(1), persistent=False)
    tree[1].register_buffer("gone", None)
    tree[2].add_module("empty", None)
    return tree


def test_the_same_dict_as_state_dict():
    same(odd_tree())
    same(ByteEncoder(4, 8, d_model=16, layers=2, heads=2, max_bytes=32))
    same(Adapter(8, 16, 1.0))
    same(nn.Linear(1, 1))


class Extra(nn.Linear):
    def get_extra_state(self):
        return {"calls": 1}

    def set_extra_state(self, state):
        pass


class OwnSave(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "renamed"] = self.w


@pytest.mark.parametrize("custom", ["extra_state", "own_save", "post_hook", "pre_hook"])
def test_a_customised_module_anywhere_in_the_tree_keeps_its_own_state_dict(custom):
    inner = {"extra_state": lambda: Extra(2, 2), "own_save": OwnSave}.get(custom, lambda: nn.Linear(2, 2))()
    seen = []
    if custom == "post_hook":
        inner._register_state_dict_hook(lambda module, sd, prefix, meta: sd.__setitem__(prefix + "added", 7))
    if custom == "pre_hook":
        inner.register_state_dict_pre_hook(lambda module, prefix, keep_vars: seen.append(prefix))
    tree = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), inner))
    got = live_state_dict(tree)
    want = tree.state_dict(keep_vars=True)
    assert list(got) == list(want)
    expected = {"extra_state": "1.1._extra_state", "own_save": "1.1.renamed", "post_hook": "1.1.added"}
    assert expected.get(custom, "1.1.weight") in got
    if custom == "pre_hook":
        assert seen == ["1.1.", "1.1."]  # the hook ran for live_state_dict too


def test_it_is_an_ordered_dict_with_metadata_like_state_dict():
    got = live_state_dict(nn.Linear(1, 1))
    assert type(got) is OrderedDict and got._metadata == OrderedDict({"": {"version": 1}})


def test_an_override_on_the_instance_counts_like_one_on_the_class():
    inner = nn.Linear(2, 2)
    inner._save_to_state_dict = lambda destination, prefix, keep_vars: destination.__setitem__(prefix + "mine", 1)
    tree = nn.Sequential(nn.Linear(2, 2), inner)
    assert list(live_state_dict(tree)) == list(tree.state_dict(keep_vars=True)) == ["0.weight", "0.bias", "1.mine"]
    top = nn.Linear(2, 2)
    top.state_dict = lambda: {"only": 1}  # takes no keep_vars: asked as it is
    assert live_state_dict(top) == {"only": 1}


def test_a_part_that_is_not_a_module_gives_its_own_state_dict():
    class Counter:
        def state_dict(self):
            return {"n": 3}

    assert live_state_dict(Counter()) == {"n": 3}


def test_state_dict_patched_on_nn_module_itself_is_followed(monkeypatch):
    """An EMA helper that patches nn.Module.state_dict for every module (so saves hold averaged weights): the
    patched class attribute is still `nn.Module.state_dict`, but it is not torch's, so it is called."""
    original = nn.Module.state_dict

    @functools.wraps(original)
    def averaged(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        return type(result)((key, torch.zeros_like(value)) for key, value in result.items())

    monkeypatch.setattr(nn.Module, "state_dict", averaged)
    model = nn.Sequential(nn.Linear(2, 2))
    got = live_state_dict(model)
    assert list(got) == ["0.weight", "0.bias"] and all(not value.any() for value in got.values())


def test_a_class_patched_during_the_run_is_seen_at_the_next_call(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 2))
    assert list(live_state_dict(model)) == ["0.weight", "0.bias"]
    monkeypatch.setattr(nn.Linear, "get_extra_state", lambda self: {"decay": 0.999}, raising=False)
    monkeypatch.setattr(nn.Linear, "set_extra_state", lambda self, state: None, raising=False)
    assert list(live_state_dict(model)) == list(model.state_dict()) == ["0.weight", "0.bias", "0._extra_state"]


def test_a_module_tree_with_a_cycle_raises_like_state_dict_instead_of_looping():
    parent = nn.Sequential(nn.Linear(2, 2))
    parent[0].add_module("parent", parent)  # parameters() still works (it skips repeats); state_dict recurses
    with pytest.raises(RecursionError):
        parent.state_dict(keep_vars=True)
    with pytest.raises(RecursionError):
        live_state_dict(parent)


def _changes() -> dict[str, object]:
    def patch_version(m):
        type(m[2])._version = 9

    return {
        "a parameter replaced": lambda m: setattr(m[0], "weight", nn.Parameter(torch.ones(4, 3))),
        "a parameter set in the dict itself": lambda m: m[0]._parameters.__setitem__("bias", None),
        "a buffer added": lambda m: m[1].register_buffer("extra", torch.ones(2)),
        "a buffer made non-persistent in place": lambda m: m[1]._non_persistent_buffers_set.add("running_mean"),
        "a child added": lambda m: m.add_module("tail", nn.Linear(2, 2)),
        "a child removed": lambda m: delattr(m, "2"),
        "a state-dict hook": lambda m: m[1]._register_state_dict_hook(
            lambda module, sd, prefix, meta: sd.__setitem__(prefix + "seen", torch.ones(1))
        ),
        "an override on the instance": lambda m: setattr(m[0], "_save_to_state_dict", lambda *a: None),
        "a class's version changed": patch_version,
        "a class's state dict patched": lambda m: setattr(type(m[2]), "get_extra_state", lambda self: 1),
        "nn.Module patched": lambda m: setattr(nn.Module, "state_dict", functools.partialmethod(nn.Module.state_dict)),
        "a module's class swapped in place": lambda m: setattr(m[0], "__class__", _Saves),
        "a module's __dict__ replaced": lambda m: setattr(
            m[0], "__dict__", {**m[0].__dict__, "_parameters": {"weight": m[0].weight}}
        ),
        "a class's version made an equal float": lambda m: setattr(type(m[2]), "_version", 1.0),
    }


class _Own(nn.Linear):
    pass


class _Slotted(nn.Linear):
    __slots__ = ("_version",)  # (its changes touch no dict)

    def __init__(self) -> None:
        super().__init__(2, 2)
        self._version = 1


class _Saves(nn.Linear):
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scale"] = torch.ones(1)


@pytest.mark.parametrize("change", list(_changes()))
def test_a_kept_state_dict_is_made_again_after_any_change(change, monkeypatch):
    """LiveStateDicts gives the same dict while nothing changed and always what state_dict gives: each change a
    module tree can undergo between steps is seen (dict version tags, the classes, the non-persistent sets)."""
    for name in ("state_dict", "_save_to_state_dict"):
        monkeypatch.setattr(nn.Module, name, getattr(nn.Module, name))  # (undone after the test)
    monkeypatch.setattr(_Own, "_version", 1, raising=False)
    monkeypatch.setattr(_Own, "get_extra_state", nn.Module.get_extra_state, raising=False)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), _Own(4, 2))
    kept = LiveStateDicts()
    first = kept("model", model)
    assert kept("model", model) is first, "nothing changed: the same dict"
    _changes()[change](model)
    got, want = kept("model", model), live_state_dict(model)  # (itself held to state_dict(keep_vars=True) above)
    assert list(got) == list(want)
    for k, value in want.items():  # (nn.Module patched: both are state_dict()'s detached copies)
        assert got[k] is value or (type(got[k]) is type(value) and torch.equal(got[k], value)), k
    assert list(got._metadata.items()) == list(want._metadata.items())
    assert list(kept("model", model)) == list(want)


def test_children_in_an_ordered_dict_reordered_are_seen():
    """OrderedDict.move_to_end changes no version tag: a tree whose dicts are not plain dicts is walked anew."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model._modules = OrderedDict(model._modules)
    kept = LiveStateDicts()
    kept("model", model)
    model._modules.move_to_end("0")
    assert list(kept("model", model)) == list(model.state_dict(keep_vars=True)) == ["1.weight", "1.bias", "0.weight",
                                                                                  "0.bias"]  # fmt: skip


def test_a_version_kept_in_a_slot_is_never_trusted_to_a_tag():
    model = nn.Sequential(nn.Linear(2, 2), _Slotted())
    kept = LiveStateDicts()
    kept("model", model)
    model[1]._version = 5  # (no dict changes)
    assert kept("model", model)._metadata["1"] == {"version": 5}


def test_a_part_replaced_under_its_name_lets_the_old_one_go():
    import gc
    import weakref

    kept = LiveStateDicts()
    old = nn.Linear(2, 2)
    kept("model", old)
    gone = weakref.ref(old)
    new = nn.Linear(2, 2)
    assert kept("model", new)["weight"] is new.weight
    del old
    gc.collect()
    assert gone() is None, "the replaced part is still held"


def test_a_part_that_changes_at_every_step_is_walked_without_the_check():
    class Busy(nn.Linear):
        def forward(self, x):
            self.last = object()  # a new attribute value at every call: the module's __dict__ changes
            return super().forward(x)

    model = Busy(2, 2)
    kept = LiveStateDicts()
    for _ in range(6):
        model(torch.ones(1, 2))
        got = kept("model", model)
        assert list(got) == ["weight", "bias"] and got["weight"] is model.weight
    assert kept._made["model"].gave_up, "still checking a part that changes every step"


def test_without_version_tags_every_call_walks(monkeypatch):
    from telepathy import module_state

    monkeypatch.setattr(module_state, "dict_version", lambda: None)
    model = nn.Linear(2, 2)
    kept = LiveStateDicts()
    first = kept("model", model)
    model.weight = nn.Parameter(torch.zeros(2, 2))
    assert kept("model", model)["weight"] is model.weight and first["weight"] is not model.weight


def _optimizer_changes() -> dict[str, object]:
    return {
        "lr changed": lambda o, m: o.param_groups[0].__setitem__("lr", 0.5),
        "state made by a step": lambda o, m: (setattr(o.param_groups[1]["params"][0], "grad", torch.ones(1)), o.step()),
        "a moment replaced": lambda o, m: o.state[m.weight].__setitem__("exp_avg", torch.zeros(2, 3)),
        "a group added": lambda o, m: o.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.1}),
        "a group's parameters reordered": lambda o, m: o.param_groups[0]["params"].reverse(),
        "the groups replaced": lambda o, m: setattr(o, "param_groups", list(reversed(o.param_groups))),
        "a state-dict hook": lambda o, m: o.register_state_dict_post_hook(lambda opt, sd: {**sd, "hooked": 1}),
        "an override on the instance": lambda o, m: setattr(o, "state_dict", lambda: {"own": 1}),
        "Optimizer patched": lambda o, m: setattr(torch.optim.Optimizer, "state_dict", _patched_optimizer_state_dict),
    }


_TORCH_OPTIMIZER_STATE_DICT = torch.optim.Optimizer.state_dict


def _patched_optimizer_state_dict(self):
    return {**_TORCH_OPTIMIZER_STATE_DICT(self), "extra": 5}


@pytest.mark.parametrize("change", list(_optimizer_changes()))
def test_a_kept_optimizer_state_dict_is_made_again_after_any_change(change, monkeypatch):
    monkeypatch.setattr(torch.optim.Optimizer, "state_dict", _TORCH_OPTIMIZER_STATE_DICT)  # (undone after)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2})
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    kept = LiveOptimizerState()
    first = kept(optimizer)
    assert kept(optimizer) is first, "nothing changed: the same dict"
    _optimizer_changes()[change](optimizer, model)
    got, want = kept(optimizer), optimizer.state_dict()
    assert repr(got) == repr(want)
    if "state" in want:
        assert all(got["state"][k] is want["state"][k] for k in want["state"])  # the optimizer's own dicts


def test_a_new_learning_rate_at_every_step_keeps_the_packed_state():
    """A scheduler changes each group's lr at every step: only the group is packed again (the same packed state,
    so the snapshot need not look at the optimizer's table again), and the result is what state_dict gives."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    kept = LiveOptimizerState()
    first = None
    for _ in range(4):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        got = kept(optimizer)
        first = first or got
        assert repr(got) == repr(optimizer.state_dict())
        assert got["state"] is first["state"] or first is got


def test_parts_no_longer_there_are_let_go():
    import gc
    import weakref

    kept = LiveStateDicts()
    part = nn.Linear(2, 2)
    kept("a", part)
    kept("b", nn.Linear(2, 2))
    gone = weakref.ref(part)
    kept.retain({"b": None})
    del part
    gc.collect()
    assert gone() is None
