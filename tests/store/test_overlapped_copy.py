"""Big states start their snapshot copy in a thread before the state is built and described
(``StepSnapshots.capture`` given a function that builds it): the slot must still hold exactly what a save at
that step writes, whatever changed during the step boundary."""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest
import torch
from harness import deep_equal

from telepathy.disk import slots
from telepathy.store import step_snapshots
from telepathy.store.overlapped_copy import OverlappedCopy
from telepathy.store.snapshot_read import files_from_slot


class _CountsWhenSaved:
    """A part whose state_dict changes one of its own tensors in place and hands back the same objects at every
    step; it must run before the copy begins (no user code runs beside it)."""

    def __init__(self) -> None:
        self.counter = torch.zeros(1000)
        self.kept = torch.arange(1000.0)
        self.copying: list[bool] = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        snapshots = getattr(self, "snapshots", None)
        self.copying.append(snapshots is not None and snapshots._copier.running)
        self.counter.numpy()[:] += 1.0  # (through NumPy: no version counter would see it)
        return {"counter": self.counter, "kept": self.kept}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counter.copy_(state["counter"])


def _checkpointer(tmp_path, monkeypatch, parts, optimizer=None):
    from telepathy.checkpointer import Checkpointer
    from telepathy.options import CheckpointOptions

    slot_dir = slots.make_slot_dir(tmp_path)
    monkeypatch.setenv(slots.SLOT_DIR_ENV, str(slot_dir))
    monkeypatch.setenv(step_snapshots.OVERLAP_ENV, "0")  # every state, however small, takes the overlapped path
    monkeypatch.setattr(step_snapshots, "_inherited", None)
    ckpt = Checkpointer(tmp_path / "save", parts=parts, optimizer=optimizer,
                        options=CheckpointOptions(snapshot_every_step=True))  # fmt: skip
    return ckpt, slot_dir


def _snapshots(tmp_path, monkeypatch) -> step_snapshots.StepSnapshots:
    monkeypatch.setenv(step_snapshots.OVERLAP_ENV, "0")
    return step_snapshots.StepSnapshots(slots.make_slot_dir(tmp_path))


def test_an_overlapped_snapshot_holds_what_a_save_writes_at_every_step(tmp_path, monkeypatch):
    from telepathy.train_state import TrainState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    counting = _CountsWhenSaved()
    redone: list[int] = []  # per step: the thread's tensors the trainer copied again
    beside: list[int] = []  # per step: the tensors the trainer copied while the thread ran
    real_redo, real_others = step_snapshots.BegunCopy.redo, step_snapshots.BegunCopy.others

    def redo(self, changed, completed):
        out = real_redo(self, changed, completed)
        redone.append(len(out))
        return out

    def others(self, destinations, sources):
        out = real_others(self, destinations, sources)
        beside.append(len(out[1]))
        return out

    monkeypatch.setattr(step_snapshots.BegunCopy, "redo", redo)
    monkeypatch.setattr(step_snapshots.BegunCopy, "others", others)
    ckpt, slot_dir = _checkpointer(tmp_path, monkeypatch, {"model": model, "counting": counting}, optimizer)
    counting.snapshots = ckpt._snapshots
    try:
        state = TrainState()
        for step in range(1, 9):
            loss = model(torch.randn(4, 6)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            random.random(), np.random.rand()  # the RNG states the snapshot reads from memory change too
            if step == 5:
                model[2].weight = torch.nn.Parameter(torch.zeros(2, 8))  # a new object: not the one copied
            state.global_step = step
            ckpt.step_boundary(state)
            counter_now = counting.counter.clone()  # (a save calls state_dict again, which counts again)
            rescued = files_from_slot(*slots.read_newest(slot_dir))
            assert torch.equal(rescued["counting"]["counter"], counter_now), step
            saved = ckpt._files(state)
            saved["counting"]["counter"] = counter_now
            assert deep_equal(rescued["model"], saved["model"]) == [], step
            assert deep_equal(rescued["optimizer"], saved["optimizer"]) == [], step
            for generator in ("python", "numpy", "torch_cpu"):
                assert deep_equal(rescued["state"]["rng"][generator], saved["state"]["rng"][generator]) == [], step
        assert ckpt._snapshots._copier._thread is not None, "the copy never ran in its thread"
        # The RNG states change during every step boundary (torch's is a new tensor, Python's and NumPy's are
        # rewritten): the thread copies them at the first overlapped step and the trainer again after it, then
        # the trainer alone, beside the thread. The weight replaced before step 5 is copied again at step 5, then
        # by the trainer at step 6 (it changed during the last boundary), then by the thread again.
        first = 8 - len(redone) + 1
        assert redone[0] == 3 and beside[0] == 0, (first, redone, beside)
        assert redone[1:] == [1 if step == 5 else 0 for step in range(first + 1, 9)], (first, redone)
        assert beside[1:] == [4 if step == 6 else 3 for step in range(first + 1, 9)], (first, beside)
        assert counting.copying and not any(counting.copying), "a part's state_dict ran while the thread copied"
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


IN_THE_WINDOW = {  # step -> a change made while the thread copies (here from inside describe): recopied, not missed
    3: lambda m: m.weight.add_(1.0),  # in place: its version moves
    4: lambda m: setattr(m.weight, "data", torch.full_like(m.weight, 7.0)),  # new storage, the version does not move
    5: lambda m: m.bias.set_(torch.full_like(m.bias, 8.0)),  # new storage, the same layout
    6: lambda m: torch.utils.swap_tensors(m.weight, torch.nn.Parameter(torch.full_like(m.weight, 9.0))),
}


def test_changes_while_the_thread_copies_are_copied_again(tmp_path, monkeypatch):
    """Nothing telepathy runs between the start of the copy and the seal changes the state; if something did, the
    slot must still hold the state as the seal found it (and the storage the thread reads must stay alive)."""
    from telepathy.train_state import TrainState

    model = torch.nn.Linear(64, 64)
    now = {"step": 0}
    real_describe = step_snapshots.describe

    def describe(files, **kwargs):
        if kwargs.get("check") is False and now["step"] in IN_THE_WINDOW:
            assert ckpt._snapshots._copier.running, "the copy was not running while the state was described"
            with torch.no_grad():
                IN_THE_WINDOW[now["step"]](model)
        return real_describe(files, **kwargs)

    monkeypatch.setattr(step_snapshots, "describe", describe)
    ckpt, slot_dir = _checkpointer(tmp_path, monkeypatch, {"model": model})
    try:
        state = TrainState()
        for step in range(1, 9):
            now["step"] = state.global_step = step
            with torch.no_grad():
                model.weight.mul_(1.5)
            ckpt.step_boundary(state)
            rescued = files_from_slot(*slots.read_newest(slot_dir))["model"]
            assert deep_equal(rescued, ckpt._files(state)["model"]) == [], step
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


def test_a_state_holding_an_inference_tensor_is_copied_after_describing(tmp_path, monkeypatch):
    """An inference tensor has no version counter to check (a cache filled during an evaluation pass)."""
    from telepathy.train_state import TrainState

    model = torch.nn.Linear(8, 8)
    with torch.inference_mode():
        model.register_buffer("cache", torch.ones(16))
    ckpt, slot_dir = _checkpointer(tmp_path, monkeypatch, {"model": model})
    try:
        state = TrainState()
        for step in (1, 2, 3):
            state.global_step = step
            with torch.inference_mode():
                model.cache.add_(1.0)
            ckpt.step_boundary(state)
            assert ckpt._snapshots.disabled is None
            assert torch.equal(files_from_slot(*slots.read_newest(slot_dir))["model"]["cache"], model.cache), step
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


def test_a_slot_that_cannot_grow_switches_snapshots_off_cleanly(tmp_path, monkeypatch):
    """/dev/shm full just as a begun copy must grow a slot, then the state shrinks back: one clear error, the
    previous snapshot kept, no closed mapping reused."""
    import errno

    from telepathy.train_state import TrainState

    class Resizable:
        def __init__(self) -> None:
            self.t = torch.zeros(1)

        def state_dict(self) -> dict[str, torch.Tensor]:
            return {"t": self.t}

    part = Resizable()
    ckpt, slot_dir = _checkpointer(tmp_path, monkeypatch, {"part": part})
    real, full = os.posix_fallocate, [False]

    def fallocate(fd, offset, length):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    try:
        state = TrainState()
        for step, n in ((1, 1 << 10), (2, 1 << 16), (3, 1 << 10)):
            part.t = torch.full((n,), float(step))
            full[0] = step == 3
            state.global_step = step
            ckpt.step_boundary(state)
        assert ckpt._snapshots.disabled is not None and "No space left" in ckpt._snapshots.disabled
        meta, data = slots.read_newest(slot_dir)
        assert meta["step"] == 2 and torch.equal(files_from_slot(meta, data)["part"]["t"], torch.full((1 << 16,), 2.0))
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


def test_a_start_interrupted_by_a_signal_leaves_the_next_step_whole(tmp_path, monkeypatch):
    """KeyboardInterrupt (or any exception from a signal handler) while the trainer waits for the thread to
    begin: the step boundary raises, and the next one waits for that copy before it begins its own."""
    from telepathy.train_state import TrainState

    model = torch.nn.Linear(32, 32)
    ckpt, slot_dir = _checkpointer(tmp_path, monkeypatch, {"model": model})
    copier = ckpt._snapshots._copier
    real_wait, interrupt = copier._begun.wait, [False]

    def wait(*args):
        real_wait(*args)
        if interrupt[0]:
            interrupt[0] = False
            raise KeyboardInterrupt

    monkeypatch.setattr(copier._begun, "wait", wait)
    try:
        state = TrainState()
        for step in (1, 2, 3):
            state.global_step = step
            with torch.no_grad():
                model.weight.add_(1.0)
            interrupt[0] = step == 2
            if step == 2:
                with pytest.raises(KeyboardInterrupt):
                    ckpt.step_boundary(state)
                assert not copier.running, "the interrupted copy outlived its step boundary"
            else:
                ckpt.step_boundary(state)
        meta, data = slots.read_newest(slot_dir)
        assert meta["step"] == 3 and deep_equal(files_from_slot(meta, data)["model"], ckpt._files(state)["model"]) == []
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


def test_rng_keys_read_from_memory_change_their_version(monkeypatch):
    """What lets a copy begun earlier see that the peeker rewrote its key tensors through NumPy."""
    from telepathy import rng_peek

    peek = rng_peek.peeker()
    if peek is None:
        pytest.skip("this Python or NumPy has no layout the peeker knows")
    key = peek.python()[1]
    before = key._version
    random.random()
    assert peek.python()[1] is key and key._version > before
    numpy_key = peek.numpy()["key"]
    before = numpy_key._version
    np.random.rand()
    assert peek.numpy()["key"] is numpy_key and numpy_key._version > before


def test_a_begun_slot_is_completed_by_the_next_write_and_never_takes_the_last_complete_one(tmp_path):
    writer = slots.SlotWriter(tmp_path)

    def fill(value):
        return lambda mapping, at, length: mapping.__setitem__(slice(at, at + length), bytes([value]) * length)

    writer.write(1, {"n": 1}, 8, fill(1))
    writer.write(2, {"n": 2}, 8, fill(2))
    writer.begin(8)  # step 3 begun: the slot of step 1 is being written
    assert slots.read_newest(tmp_path)[0]["n"] == 2
    writer.begin(8)  # begun again (a capture that never came): still that slot, step 2 untouched
    assert slots.read_newest(tmp_path)[0]["n"] == 2
    writer.write(3, {"n": 3}, 8, fill(3))
    meta, data = slots.read_newest(tmp_path)
    assert (meta["step"], meta["n"], data) == (3, 3, bytes([3]) * 8)
    writer.write(4, {"n": 4}, 8, fill(4))  # the other slot, as without begin()
    assert {slots._read_slot(tmp_path / f"slot{i}")[1]["n"] for i in range(2)} == {3, 4}
    writer.close()


def test_a_forked_child_copies_itself(tmp_path):
    copier = OverlappedCopy()
    source, target = [torch.arange(4.0)], [torch.zeros(4)]
    assert copier.start(target, source) and copier.wait() and torch.equal(target[0], source[0])
    pid = os.fork()
    if pid == 0:  # (the thread stayed in the parent: no start, no hang)
        os._exit(0 if copier.start([torch.zeros(4)], source) is False else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("text", ["-1", "lots", "nan", "inf"])
def test_a_bad_overlap_threshold_is_named_and_the_default_used(monkeypatch, caplog, text):
    monkeypatch.setenv(step_snapshots.OVERLAP_ENV, text)
    assert step_snapshots._overlap_bytes() == step_snapshots.OVERLAP_MIB << 20
    assert step_snapshots.OVERLAP_ENV in caplog.text


class _LateCopier:
    """A copier whose thread begins its copy a while after it was started: whatever the trainer writes meanwhile
    where the copy goes is overwritten, deterministically."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, destinations: list[torch.Tensor], sources: list[torch.Tensor], meanwhile=None) -> bool:
        def copy() -> None:
            time.sleep(0.2)
            with torch.inference_mode():
                torch._foreach_copy_(destinations, sources)

        self._thread = threading.Thread(target=copy)
        self._thread.start()
        if meanwhile is not None:
            meanwhile()
        return True

    def wait(self) -> bool:
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        return True

    stop = wait


@pytest.mark.parametrize("grows", ["meta", "layout"])
def test_a_slot_whose_data_must_move_waits_for_the_thread_first(tmp_path, monkeypatch, grows):
    """The meta (or the layout: the store's options here) outgrows its room while the thread copies into the
    begun slot: the writer moves the data (and may remap the slot) only once that copy has ended; else the copy
    lands on the moved meta or layout. The slot holds each step exactly."""
    snapshots = _snapshots(tmp_path, monkeypatch)
    snapshots._copier = _LateCopier()
    weights = torch.zeros(1 << 16)
    big = "x" * (max(slots.META_ROOM, slots.LAYOUT_ROOM) * 2)
    try:
        for step in range(1, 7):
            weights.fill_(float(step))
            files = {"model": {"w": weights}}
            note, store = (big, {}) if grows == "meta" else ("", {"pad": big})
            if step != 4:
                note, store = "", {}
            snapshots.capture(step, files, {"reason": "rescue", "note": note}, store)
            meta, data = slots.read_newest(snapshots.writer.dir)
            assert meta["step"] == step and deep_equal(files_from_slot(meta, data), files) == [], step
            assert meta["info"]["note"] == note and meta["store"] == store
    finally:
        snapshots.close()


def test_a_tensor_whose_strides_change_in_place_is_copied_through_a_fresh_alias(tmp_path, monkeypatch):
    """``t_()`` on a square weight keeps the object, its address, dtype and shape; only the strides change. The
    alias the thread copied from at earlier steps has the old strides: it must not be reused."""
    snapshots = _snapshots(tmp_path, monkeypatch)
    weight, other = torch.randn(256, 256), torch.randn(1 << 16)
    try:
        for step in range(1, 8):
            weight.add_(1.0)
            other.add_(1.0)
            if step in (3, 5):
                weight.t_()
            files = {"model": {"w": weight, "o": other}}
            snapshots.capture(step, files, {"reason": "rescue"}, {})
            meta, data = slots.read_newest(snapshots.writer.dir)
            assert meta["step"] == step and deep_equal(files_from_slot(meta, data), files) == [], step
        assert snapshots._copier._thread is not None, "the copy never ran in its thread"
    finally:
        snapshots.close()


def test_a_tensor_replaced_at_every_step_is_not_kept_alive(tmp_path, monkeypatch):
    """A new object at every step (a functional EMA; TrainState.extra is cloned at each boundary): once it is
    known to change, no alias of an old one is kept."""
    import gc
    import weakref

    snapshots = _snapshots(tmp_path, monkeypatch)
    weights, alive = torch.randn(1000), {}
    try:
        for step in range(1, 12):
            ema = torch.full((1 << 18,), float(step))
            alive[step] = weakref.ref(ema)
            snapshots.capture(step, {"model": {"w": weights}, "ema": {"v": ema}}, {"reason": "rescue"}, {})
            del ema
        gc.collect()
        assert [step for step, ref in alive.items() if ref() is not None] == [11]
        assert torch.equal(
            files_from_slot(*slots.read_newest(snapshots.writer.dir))["ema"]["v"], torch.full((1 << 18,), 11.0)
        )
    finally:
        snapshots.close()


def test_a_step_where_every_tensor_changed_does_not_end_the_overlap(tmp_path, monkeypatch):
    """Every tensor a new object during one boundary (a restore with assign=True): the next steps overlap again."""
    snapshots = _snapshots(tmp_path, monkeypatch)
    state, began = {"a": torch.randn(1 << 16), "b": torch.randn(1 << 16)}, []
    real_start, real_describe = snapshots._copier.start, step_snapshots.describe

    def start(*args, **kwargs):
        began.append(step)
        return real_start(*args, **kwargs)

    def describe(files, **kwargs):
        if kwargs.get("check") is False and step == 3:  # (inside the boundary, while the thread copies)
            state.update({k: t.clone() for k, t in state.items()})
            files["m"] = dict(state)
        return real_describe(files, **kwargs)

    monkeypatch.setattr(snapshots._copier, "start", start)
    monkeypatch.setattr(step_snapshots, "describe", describe)
    try:
        for step in range(1, 10):
            for t in state.values():
                t.add_(1.0)
            files = {"m": dict(state)}
            snapshots.capture(step, files, {"reason": "rescue"}, {})
            assert deep_equal(files_from_slot(*slots.read_newest(snapshots.writer.dir))["m"], state) == [], step
        assert began == [2, 3, 5, 6, 7, 8, 9], began  # (step 4 copies after describing, and forgets step 3)
    finally:
        snapshots.close()


@pytest.mark.parametrize("overlap", ["0", "1000000"])
def test_a_storage_freed_in_place_turns_snapshots_off_with_its_reason(tmp_path, monkeypatch, caplog, overlap):
    """``untyped_storage().resize_(0)`` (offloading) between steps: a copy would read memory that is not there
    (SIGSEGV). Snapshots go off with one error that names it; the last complete one stays; no crash."""
    monkeypatch.setenv(step_snapshots.OVERLAP_ENV, overlap)
    snapshots = step_snapshots.StepSnapshots(slots.make_slot_dir(tmp_path))
    weights, other = torch.randn(1 << 20), torch.randn(1 << 10)
    try:
        for step in range(1, 5):
            if step == 3:
                weights.untyped_storage().resize_(0)
            snapshots.capture(step, {"m": {"w": weights, "v": other}}, {"reason": "rescue"}, {})
        assert snapshots.disabled is not None and "freed or shrunk in place" in snapshots.disabled
        assert "per-step snapshots are off" in caplog.text and "(1048576,)" in caplog.text
        assert slots.read_newest(snapshots.writer.dir)[0]["step"] == 2
    finally:
        snapshots.close()


def test_close_ends_the_copy_thread_and_lets_go_of_the_last_copy(tmp_path, monkeypatch):
    import gc
    import weakref

    alive, before = [], {t for t in threading.enumerate() if t.name == "telepathy-snapshot-copy"}
    for run in range(3):
        (tmp_path / str(run)).mkdir()
        snapshots = _snapshots(tmp_path / str(run), monkeypatch)
        weights = torch.randn(1 << 18)
        for step in range(1, 4):
            snapshots.capture(step, {"m": {"w": weights}}, {"reason": "rescue"}, {})
        assert snapshots._copier._thread is not None
        alive.append(weakref.ref(weights))
        snapshots.close()
        del snapshots, weights
    gc.collect()
    assert not [t for t in threading.enumerate() if t.name == "telepathy-snapshot-copy" and t not in before]
    assert not [ref for ref in alive if ref() is not None]


_REALLOCATED = """
import os, sys
from pathlib import Path
import torch
from telepathy.disk import slots
from telepathy.store import step_snapshots
from telepathy.store.snapshot_read import files_from_slot

snapshots = step_snapshots.StepSnapshots(slots.make_slot_dir(Path(sys.argv[1])))
n, how = 1 << 20, sys.argv[2]
weights, other, held = torch.randn(n), torch.randn(1000), []
for step in range(1, 6):
    if step == 4:
        before, storage = weights.data_ptr(), weights.untyped_storage()
        storage.resize_(0)  # offloaded
        if how == "half":  # reloaded with half its bytes: the heap may hand back the same address
            storage.resize_(n * 2)
        else:  # reloaded into a new storage of the same size, which malloc may place where the old one was
            fresh = torch.empty(n)
            while fresh.data_ptr() != before and len(held) < 100:
                held.append(fresh)
                fresh = torch.empty(n)
            weights.set_(fresh.untyped_storage(), 0, (n,), (1,))
            weights.fill_(7.0)
        print("same address:", weights.data_ptr() == before, flush=True)
    if how != "half" or step < 4:
        weights.add_(1.0)
    snapshots.capture(step, {"m": {"w": weights, "o": other}}, {"reason": "rescue"}, {})
    if snapshots.disabled is None:
        rescued = files_from_slot(*slots.read_newest(snapshots.writer.dir))["m"]["w"]
        assert torch.equal(rescued, weights), step
assert (snapshots.disabled is not None) == (how == "half"), snapshots.disabled
snapshots.close()
print("PASS")
"""


@pytest.mark.parametrize("overlap", ["0", "1000000"])
@pytest.mark.parametrize("how", ["half", "new storage"])
def test_a_storage_reallocated_at_the_same_address_is_checked_again(tmp_path, overlap, how):
    """Offloaded and reloaded between steps, at the address it had (glibc hands it back: the child's
    MALLOC_MMAP_THRESHOLD_ makes that happen every time). Half its bytes: snapshots go off; a new storage: the
    alias kept from the last step (the old, emptied storage) is not reused. No SIGSEGV either way."""
    import subprocess
    import sys

    threshold = "33554432" if how == "half" else "131072"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": threshold, step_snapshots.OVERLAP_ENV: overlap}
    done = subprocess.run([sys.executable, "-c", _REALLOCATED, str(tmp_path), how], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "PASS" in done.stdout, (done.returncode, done.stdout, done.stderr[-2000:])


@pytest.mark.parametrize("when", ["first step", "later, the same object"])
def test_a_meta_tensor_turns_snapshots_off_with_its_name(tmp_path, monkeypatch, caplog, when):
    """A normal save writes a meta tensor (no data); a snapshot cannot copy one: off, named, no exception."""
    snapshots = _snapshots(tmp_path, monkeypatch)
    lazy = torch.empty(4, device="meta") if when == "first step" else torch.zeros(4)
    try:
        for step in range(1, 4):
            if step == 2 and when != "first step":
                torch.utils.swap_tensors(lazy, torch.empty(4, device="meta"))
            snapshots.capture(step, {"m": {"w": torch.ones(1 << 16), "lazy": lazy}}, {"reason": "rescue"}, {})
        assert snapshots.disabled is not None and "/m/lazy" in snapshots.disabled
        assert "meta device" in caplog.text
    finally:
        snapshots.close()


def test_closing_a_checkpointer_ends_its_copy_thread_and_unmaps_its_slots(tmp_path, monkeypatch):
    from telepathy.train_state import TrainState

    before = {t for t in threading.enumerate() if t.name == "telepathy-snapshot-copy"}
    model = torch.nn.Linear(64, 64)
    ckpt, slot_dir = _checkpointer(tmp_path, monkeypatch, {"model": model})
    try:
        state = TrainState()
        for step in (1, 2, 3):
            state.global_step = step
            ckpt.step_boundary(state)
        assert ckpt._snapshots._copier._thread is not None
        ckpt.close()
        assert not [t for t in threading.enumerate() if t.name == "telepathy-snapshot-copy" and t not in before]
        assert not ckpt._snapshots.writer._maps
        assert slots.read_newest(slot_dir)[0]["step"] == 3  # (the slots stay for the supervisor)
    finally:
        ckpt.close()
        slots.remove_slot_dir(slot_dir)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_nested_tensor_turns_snapshots_off_with_its_name(tmp_path, monkeypatch, caplog):
    snapshots = _snapshots(tmp_path, monkeypatch)
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    try:
        snapshots.capture(1, {"m": {"w": torch.ones(8), "nt": nested}}, {"reason": "rescue"}, {})
        assert snapshots.disabled is not None and "/m/nt" in snapshots.disabled and "nested" in caplog.text
    finally:
        snapshots.close()
