"""Besides dict, list and tuple, ``torch.load(weights_only=True)`` reads back collections.Counter (MultiStepLR keeps
its milestones in one), OrderedDict, set and torch.Size, so a full save resumes them as they were. Async,
differential and compressed saves and the per-step snapshot used to make them a dict, a list and a tuple: the
resumed run held other kinds than the saved one without a word (a resumed MultiStepLR's ``step(epoch)`` then failed
on ``dict.elements``). Every path must give back the saved kinds."""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict, namedtuple
from typing import Any

import pytest
import torch
from harness import SAVE_MODES, deep_equal

from telepathy.checkpointer import Checkpointer
from telepathy.disk import slots
from telepathy.errors import UsageError
from telepathy.store.snapshot_format import describe, rebuild
from telepathy.store.snapshot_read import SnapshotInvalid, files_from_slot
from telepathy.store.step_snapshots import StepSnapshots
from telepathy.train_state import TrainState

MODES = SAVE_MODES


def holder_state() -> dict[str, Any]:
    return {
        "counter": Counter({10: 1, 20: 2}),
        "ordered": OrderedDict([("b", 1), ("a", torch.arange(3.0))]),
        "set": {3, 1, 2},
        "size": torch.Size([2, 3]),
        "nested": [(1, torch.Size([4]), Counter(x=2))],
        "weights": torch.arange(40000.0),  # a blob in the differential formats
    }


def kinds(obj: Any) -> Any:
    """The kind of every container, recursively (what deep equality does not see: Counter({1: 1}) == {1: 1})."""
    if isinstance(obj, dict):
        return (type(obj).__name__, {k: kinds(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple, set)):
        return (type(obj).__name__, [kinds(v) for v in (sorted(obj) if isinstance(obj, set) else obj)])
    return type(obj).__name__


class Holder:
    """A part that is not a module: its state dict is whatever it holds."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state or {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict


@pytest.mark.parametrize("mode", MODES)
def test_every_save_mode_resumes_the_saved_container_kinds(tmp_path, mode):
    saved = holder_state()
    with Checkpointer(tmp_path, parts={"holder": Holder(saved)}, **MODES[mode]) as ckpt:
        ckpt.save(TrainState(global_step=1), "test", blocking=not MODES[mode].get("async_save"))
    resumed = Holder({k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in saved.items()})
    with Checkpointer(tmp_path, parts={"holder": resumed}, **MODES[mode]) as ckpt:
        assert ckpt.resume().global_step == 1
    assert kinds(resumed.state) == kinds(saved)
    assert deep_equal(resumed.state, saved) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_resumed_multisteplr_keeps_its_counter_and_steps_by_epoch(tmp_path, mode):
    def run() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.5)

    optimizer, scheduler = run()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    options = {"optimizer": optimizer, "scheduler": scheduler, **MODES[mode]}
    with Checkpointer(tmp_path, parts={}, **options) as ckpt:
        ckpt.save(TrainState(global_step=3), "test", blocking=not MODES[mode].get("async_save"))
    optimizer, scheduler = run()
    with Checkpointer(tmp_path, parts={}, optimizer=optimizer, scheduler=scheduler, **MODES[mode]) as ckpt:
        ckpt.resume()
    assert type(scheduler.milestones) is Counter
    with pytest.warns(UserWarning):  # (the epoch argument is deprecated, and still works)
        scheduler.step(5)
    assert optimizer.param_groups[0]["lr"] == 0.25


def test_a_per_step_snapshot_gives_back_the_saved_container_kinds(tmp_path):
    saved = holder_state()
    back = rebuild(*describe({"holder": saved}))["holder"]
    assert kinds(back) == kinds(saved) and deep_equal(back, saved) == []
    snapshots = StepSnapshots(tmp_path)
    try:
        snapshots.capture(1, {"holder": saved}, {"reason": "rescue"}, {})
        assert snapshots.disabled is None, snapshots.disabled
        rescued = files_from_slot(*slots.read_newest(tmp_path))["holder"]
    finally:
        snapshots.close()
    assert kinds(rescued) == kinds(saved) and deep_equal(rescued, saved) == []


FLOATS, INTS = [["torch.float32", [1, 2], 0, 8]], [["torch.int64", [40], 0, 320]]


@pytest.mark.parametrize(
    ("node", "rows"),
    [({"__O__": [1]}, []), ({"__C__": 5}, []), ({"__S__": [2, -1]}, []), ({"__S__": ["2"]}, []),
     ({"__s__": [{"a": 1}]}, []), ({"__S__": 3}, []), ({"__O__": {"__T__": 0}}, FLOATS),
     ({"__C__": {"__T__": 0}}, FLOATS), ({"__C__": {"__s__": [1, 2]}}, []), ({"__C__": {"__L__": 0}}, INTS),
     ({"__C__": {"__S__": [3, 3]}}, []), ({"__S__": [2**63]}, [])],
    ids=["ordered-list", "counter-int", "size-negative", "size-str", "set-of-dicts", "size-int", "ordered-tensor",
         "counter-tensor", "counter-set", "counter-ints", "counter-size", "size-past-int64"],
)  # fmt: skip
def test_a_hostile_container_node_is_refused_not_rebuilt(node, rows):
    """(Review 6: a Counter or OrderedDict node around a tensor, a set or a list was built from its elements.)"""
    meta = {"tensors": rows, "constants": [], "files": {"part": {"x": node}}}
    with pytest.raises(SnapshotInvalid):
        files_from_slot(meta, bytes(sum(r[3] for r in rows)))


@pytest.mark.parametrize("marker", ["__O__", "__C__"])
def test_a_snapshot_whose_files_are_not_a_plain_dict_is_refused(marker):
    meta = {"tensors": [], "constants": [], "files": {marker: {"part": {"n": 1}}}}
    with pytest.raises(SnapshotInvalid):
        files_from_slot(meta, b"")


@pytest.mark.parametrize("mode", ["differential", "compressed"])
def test_a_set_of_big_tensors_is_refused_by_the_formats_that_store_them_apart(tmp_path, mode):
    """(Review 6: such a set came back a list: its tensors become blob references, which a set cannot hold.)"""
    state = {"s": {torch.arange(40000.0)}}
    with Checkpointer(tmp_path, parts={"holder": Holder(state)}, **MODES[mode]) as ckpt:
        with pytest.raises(UsageError, match="a set holding tensors"):
            ckpt.save(TrainState(global_step=1), "test")
        assert ckpt.store.committed() == []


class Ordered(OrderedDict):
    pass


Pair = namedtuple("Pair", "a b")


OTHER_KINDS = {
    "defaultdict": lambda: defaultdict(int, a=1),
    "namedtuple": lambda: Pair(1, 2),
    "frozenset": lambda: frozenset({1, 2}),
    "OrderedDict subclass": lambda: Ordered(a=1),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_a_kind_a_checkpoint_cannot_load_back_is_refused_by_every_save_mode(tmp_path, mode, kind):
    """Review 6: a full save wrote such a state and committed it (a stop said 99) though no resume could load it;
    the other modes converted it (a defaultdict came back a dict). Every mode now refuses it by name, commits
    nothing, and the snapshot turns itself off."""
    state = {"weights": torch.ones(3), "odd": OTHER_KINDS[kind]()}
    with Checkpointer(tmp_path, parts={"holder": Holder(state)}, **MODES[mode]) as ckpt:
        with pytest.raises(UsageError, match="cannot load back"):
            ckpt.save(TrainState(global_step=1), "test")
        assert ckpt.store.committed() == []
    assert not list((tmp_path / "checkpoints").glob("*")), "a temporary checkpoint was left behind"


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_a_kind_a_checkpoint_cannot_load_back_turns_the_snapshot_off(tmp_path, kind):
    snapshots = StepSnapshots(tmp_path)
    try:
        snapshots.capture(1, {"holder": {"odd": OTHER_KINDS[kind]()}}, {"reason": "rescue"}, {})
        assert snapshots.disabled is not None and "odd" in snapshots.disabled
    finally:
        snapshots.close()
