"""Per-step snapshots against a hostile or constrained machine (from an adversarial review of the rescue path): a
/dev/shm too small for the slots, slot directories the supervisor did not make, a slot that is a FIFO or holds
a hostile meta, a tensor table that does not describe its bytes. Nothing crashes, hangs or is committed wrongly,
and the library deletes only what it made."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from adversary import tmpfs
from torch import nn

from telepathy.disk import slots
from telepathy.disk.save_dir import SaveDir
from telepathy.rescue import rescue
from telepathy.store import step_snapshots
from telepathy.store.snapshot_read import SnapshotInvalid, files_from_slot
from telepathy.store.step_snapshots import StepSnapshots


def state(width: int = 64) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(width, width)
    return {"model": model.state_dict(), "state": {"global_step": 3, "rng": {"internal": list(range(625))}}}


def capture(directory, step: int = 3, files=None) -> StepSnapshots:
    snapshots = StepSnapshots(directory)
    snapshots.capture(step, files or state(), {"step": step}, {"keep_last": 2}, "")
    return snapshots


# ----------------------------------------------------------------------------------- a full /dev/shm
def test_a_slot_that_does_not_fit_in_shared_memory_switches_snapshots_off_instead_of_a_bus_error(tmp_path, root_only):
    """tmpfs files are sparse: before, the copy into a slot larger than the free memory died of SIGBUS (so the
    captures run in a child process: a regression kills it, not the test run)."""
    script = """
import logging, sys, torch
from torch import nn
from telepathy.disk import slots
from telepathy.store.step_snapshots import StepSnapshots
logging.basicConfig(level=logging.ERROR)
slot_dir = slots.make_slot_dir(__import__("pathlib").Path(sys.argv[1]))
for width, step in ((512, 1), (64, 2)):  # 1 MiB of weights: more than the tmpfs holds; then a small state
    snapshots = StepSnapshots(slot_dir)
    snapshots.capture(step, {"model": nn.Linear(width, width).state_dict()}, {}, {}, "")
    print("step", step, "disabled" if snapshots.disabled else "captured", flush=True)
print("newest", slots.read_newest(slot_dir)[0]["step"])
"""
    with tmpfs(tmp_path / "shm", "size=256k") as shm:
        done = subprocess.run([sys.executable, "-c", script, str(shm)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 1 disabled" in done.stdout and "step 2 captured" in done.stdout and "newest 2" in done.stdout
    assert "snapshots are off" in done.stderr and "shm-size" in done.stderr


# ------------------------------------------------------------------- whose directory is it
def test_start_up_removes_only_slot_directories_of_dead_supervisors(tmp_path):
    users = tmp_path / "telepathy-424242-my-results"  # named like ours, not ours: no marker
    users.mkdir()
    (users / "data.txt").write_text("mine")
    dead = slots.make_slot_dir(tmp_path)
    os.close(slots._held.pop(dead))  # its supervisor died (SIGKILL): the lock went with it
    alive = tmp_path / "telepathy-1-alive-x"  # another supervisor's, in another PID namespace: locked
    alive.mkdir(mode=0o700)
    holder = os.open(alive / slots.MARKER, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        mine = slots.make_slot_dir(tmp_path)
        assert not dead.exists() and alive.is_dir() and (users / "data.txt").read_text() == "mine"
        slots.remove_slot_dir(mine)
    finally:
        os.close(holder)


@pytest.mark.parametrize("how", ["symlink", "no marker", "not private", "a file", "missing"])
def test_a_snapshot_directory_the_supervisor_did_not_make_is_refused_loudly(tmp_path, monkeypatch, caplog, how):
    real = slots.make_slot_dir(tmp_path)
    target = {"symlink": tmp_path / "link", "no marker": tmp_path / "plain", "not private": real,
              "a file": tmp_path / "file", "missing": tmp_path / "gone"}[how]  # fmt: skip
    if how == "symlink":
        target.symlink_to(real)
    elif how == "no marker":
        target.mkdir(mode=0o700)
    elif how == "not private":
        os.chmod(real, 0o755)
    elif how == "a file":
        target.write_text("x")
    monkeypatch.setenv(slots.SLOT_DIR_ENV, str(target))
    monkeypatch.setattr(step_snapshots, "_inherited", None)
    with caplog.at_level(logging.WARNING, logger="telepathy"):
        assert step_snapshots.from_environment(True, several_ranks=False) is None
    assert "snapshots are off" in caplog.text and str(target) in caplog.text
    assert not list(real.glob("slot*")) and slots.SLOT_DIR_ENV not in os.environ
    slots.remove_slot_dir(real)


def test_processes_the_trainer_starts_do_not_inherit_its_slots(tmp_path, monkeypatch):
    """An evaluation job the trainer starts, with a Checkpointer of its own, must not write into the trainer's
    slots: its state would be rescued in the trainer's place."""
    slot_dir = slots.make_slot_dir(tmp_path)
    monkeypatch.setenv(slots.SLOT_DIR_ENV, str(slot_dir))
    monkeypatch.setattr(step_snapshots, "_inherited", None)
    try:
        assert step_snapshots.from_environment(True, several_ranks=False) is not None
        assert step_snapshots.from_environment(True, several_ranks=False) is not None  # a second one, same process
        child = subprocess.run([sys.executable, "-c", f"import os; print(os.environ.get({slots.SLOT_DIR_ENV!r}))"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert child.stdout.strip() == "None"
    finally:
        slots.remove_slot_dir(slot_dir)


# --------------------------------------------------------------------------- hostile slots
def test_a_fifo_slot_never_hangs_the_supervisor_and_a_hostile_meta_does_not_hide_the_good_slot(tmp_path):
    capture(tmp_path, step=3)  # slot1 (the writer starts at seq 1)
    os.mkfifo(tmp_path / "slot0")
    found = []
    reader = threading.Thread(target=lambda: found.append(slots.read_newest(tmp_path)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "read_newest blocked on a FIFO"
    assert found[0][0]["step"] == 3
    (tmp_path / "slot0").unlink()
    nested = b'{"step":9,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    header = slots.HEADER.pack(slots.MAGIC, 9, 9, len(nested), 0, 128 + len(nested), 2, 128)
    (tmp_path / "slot0").write_bytes(header + b"{}".ljust(64, b" ") + nested)
    assert slots.read_newest(tmp_path)[0]["step"] == 3  # the deeply nested one skipped, not the good one lost


def hostile(meta: dict, how: str) -> None:
    rows, files = meta["tensors"], meta["files"]
    if how == "zero bytes, real shape":
        rows[0][3] = 0
    elif how == "negative offset":
        rows[0][2] = -rows[0][3]
    elif how == "overlapping rows":
        rows[1][2] = rows[0][2]
    elif how == "past the data":
        rows[-1][2] += 1 << 20
    elif how == "unknown dtype":
        rows[0][0] = "torch.evil"
    elif how == "huge shape":
        rows[0][1], rows[0][3] = [1 << 20, 1 << 20], 0
    elif how == "negative index":
        files["state"]["global_step"] = {"__T__": -1}
    elif how == "a tensor named twice":
        model_node(files)["__TS__"][0] = 1
    elif how == "no table":
        del meta["tensors"]
    elif how == "no constants":
        del meta["constants"]
    elif how == "a key set out of range":
        model_node(files)["__TS__"][1] = 99
    elif how == "a key set that repeats a key":
        keys = meta["constants"][model_node(files)["__TS__"][1]]
        keys[1] = keys[0]
    elif how == "versions that are a key set":
        files["model"]["__V__"][0] = model_node(files)["__TS__"][1]
    elif how == "a key set that is versions":
        model_node(files)["__TS__"][1] = files["model"]["__V__"][0]
    elif how == "versions with a plain value inside":
        files["model"]["__V__"][1] = 5
    elif how == "a version that is not a number":
        meta["constants"][files["model"]["__V__"][0]][""]["version"] = "x"
    elif how == "two markers in one node":
        files["model"]["__V__"][1] = {"__L__": 0, "__TS__": [0, 99]}
    elif how == "a dict node with a pair of three":
        files["state"]["rng"] = {"__d__": [[1, 2, 3]]}
    elif how == "a tuple node that is a number":
        files["state"]["rng"] = {"__t__": 5}
    elif how == "an unknown marker":
        files["state"]["rng"] = {"__Q__": 1}
    elif how == "a fixed value out of range":
        files["state"]["rng"] = {"__K__": 99}
    elif how == "a fixed value naming a tensor":
        meta["constants"].append({"value": {"x": {"__T__": 0}}})
        files["state"]["rng"] = {"__K__": len(meta["constants"]) - 1}
    elif how == "a fixed value named twice":  # (each reference rebuilt as a copy: a small meta, a huge state)
        meta["constants"].append({"value": [0] * 1000})
        files["state"]["rng"] = [{"__K__": len(meta["constants"]) - 1}] * 2
    elif how == "module versions named twice":
        files["state"]["rng"] = {"__V__": [model_node_versions(files), {}]}
    elif how == "a fixed value naming itself":
        meta["constants"].append({"value": {"__K__": len(meta["constants"])}})
        files["state"]["rng"] = {"__K__": len(meta["constants"]) - 1}


def model_node_versions(files: dict) -> int:
    """The constant holding the model's module versions (named by the model's node already)."""
    return files["model"]["__V__"][0]


def model_node(files: dict) -> dict:
    """The model's tensor dict node, inside the node carrying its module versions."""
    return files["model"]["__V__"][1]


HOSTILE = ["zero bytes, real shape", "negative offset", "overlapping rows", "past the data", "unknown dtype",
           "huge shape", "negative index", "a tensor named twice", "no table", "no constants", "a key set out of range",
           "a key set that repeats a key", "versions that are a key set", "a key set that is versions",
           "versions with a plain value inside", "a version that is not a number", "two markers in one node",
           "a dict node with a pair of three", "a tuple node that is a number", "an unknown marker",
           "a fixed value out of range", "a fixed value naming a tensor", "a fixed value naming itself",
           "a fixed value named twice", "module versions named twice"]  # fmt: skip


@pytest.mark.parametrize("how", HOSTILE)
def test_a_snapshot_whose_table_does_not_describe_its_bytes_is_never_committed(tmp_path, how):
    slot_dir, save_dir = tmp_path / "slots", tmp_path / "save"
    slot_dir.mkdir()
    files = state()
    capture(slot_dir, files=files)
    meta, data = slots.read_newest(slot_dir)
    assert files_from_slot(meta, data)["model"]["weight"].equal(files["model"]["weight"])  # the untouched one
    hostile(meta, how)
    with pytest.raises(SnapshotInvalid):
        files_from_slot(meta, data)
    # The same lie in the slot file itself, through the supervisor's rescue: refused, nothing committed.
    step_only = json.dumps({"step": meta.pop("step")}).encode()
    body = json.dumps(meta, separators=(",", ":")).encode()  # (the rest goes where the layout was)
    path = slot_dir / "slot1"
    raw = bytearray(path.read_bytes())
    magic, begin, end, meta_len, data_len, data_at, layout_len, meta_at = slots.HEADER.unpack_from(raw, 0)
    assert len(body) <= meta_at - 64
    raw[64 : 64 + len(body)] = body
    raw[meta_at : meta_at + len(step_only)] = step_only
    slots.HEADER.pack_into(raw, 0, magic, begin, end, len(step_only), data_len, data_at, len(body), meta_at)
    path.write_bytes(bytes(raw))
    started = time.monotonic()
    with pytest.raises(SnapshotInvalid, match="nothing committed"):
        rescue(slot_dir, save_dir, "SIGKILL")
    assert time.monotonic() - started < 30 and not SaveDir(save_dir).committed()
