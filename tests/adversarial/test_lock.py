"""Rule 4, the lock: ``telepathy status`` (and the other readers) never write to the save dir and never take the lock,
so a run starting during a ``status`` loop always gets it, and they work on a read-only save dir. Deleting
``.telepathy.lock`` (or the whole save dir) under a live writer: a second writer is refused while the first is alive,
or the first stops before committing or pruning anything of the second's (SaveDirBusy, exit 75). A damaged holder
record never crashes a writer or ``status``."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from adversary import (
    REPO,
    assert_no_traceback,
    assert_one_line_error,
    assert_still_verified,
    audit,
    checkpointer,
    cli,
    diff_snapshots,
    inside,
    make_run,
    program,
    python_code,
    read_only_view,
    snapshot,
    verified,
)

from telepathy.disk.lock import SaveDirLock
from telepathy.errors import SaveDirBusy
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.train_state import TrainState

HELPERS = str(REPO / "tests" / "helpers")


# ------------------------------------------------------------------------------------- readers never write
def layout(save_dir, kind):
    """A save dir in one of the states an operator finds runs in; returns a lock held meanwhile, if any."""
    make_run(save_dir, fmt="differential" if kind == "differential" else "full")
    checkpoints = save_dir / "checkpoints"
    if kind == "stale temporaries":
        (checkpoints / ".tmp-step_00000004-otherhost-4242-0123abcd").mkdir()
        (checkpoints / ".tmp-step_00000004-otherhost-4242-0123abcd" / "model.pt").write_bytes(b"half")
        (checkpoints / ".trash-step_00000001-4242-0123abcd").mkdir()
    elif kind == "latest is a copy":
        os.unlink(save_dir / "latest")
        shutil.copytree(checkpoints / "step_00000003", save_dir / "latest")
    elif kind == "torn events":
        with open(save_dir / "events.jsonl", "ab") as f:
            f.write(b'{"time": 1, "event": "sa')
    elif kind == "no events":
        (save_dir / "events.jsonl").unlink()
    elif kind == "no lock file":
        (save_dir / ".telepathy.lock").unlink()
        (save_dir / ".telepathy.lock.json").unlink()
    elif kind == "dangling latest":
        os.unlink(save_dir / "latest")
        os.symlink("checkpoints/step_00000042", save_dir / "latest")
    elif kind == "live writer":
        lock = SaveDirLock(save_dir)
        lock.acquire()
        return lock
    return None


LAYOUTS = ["plain", "differential", "stale temporaries", "latest is a copy", "torn events", "no events",
           "no lock file", "dangling latest", "live writer"]  # fmt: skip
READERS = [["status"], ["status", "--json"], ["list"], ["list", "--json"], ["verify"], ["verify", "--load"]]


@pytest.mark.parametrize("reader", READERS, ids=" ".join)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_readers_never_write_to_the_save_dir_nor_take_the_lock(save_dir, monkeypatch, kind, reader):
    held = layout(save_dir, kind)
    try:
        before = snapshot(save_dir)
        locks = []
        monkeypatch.setattr(fcntl, "flock", lambda *a: locks.append(("flock", a)))
        monkeypatch.setattr(fcntl, "lockf", lambda *a: locks.append(("lockf", a)))
        with audit() as records:
            done = cli(reader[0], str(save_dir), *reader[1:])
        monkeypatch.undo()
        assert "Traceback" not in done.text and done.code in (0, 1), done.text[-2000:]
        assert locks == [], f"{reader[0]} took a lock: {locks}"
        writes = [r for r in records if r[0] in ("write", "delete", "rename") and inside(r[1], save_dir)]
        assert writes == [], f"{reader[0]} wrote to the save dir: {writes[:5]}"
        assert diff_snapshots(before, snapshot(save_dir)) == []
    finally:
        if held is not None:
            held.release()


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["status", "list", "verify"])
def test_a_run_starting_during_a_reader_loop_always_gets_the_lock(save_dir, reader):
    make_run(save_dir)
    loop = (
        "import sys, time, io, contextlib\nfrom telepathy.__main__ import main\nend = time.monotonic() + 4\nn = 0\n"
        "while time.monotonic() < end:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        main([sys.argv[1], sys.argv[2]])\n"
        "    n += 1\n"
        "print(n)\n"
    )
    readers = subprocess.Popen([sys.executable, "-c", loop, reader, str(save_dir)], stdout=subprocess.PIPE, text=True)
    refused = attempts = 0
    try:
        while readers.poll() is None:
            lock = SaveDirLock(save_dir)
            attempts += 1
            try:
                lock.acquire()
            except SaveDirBusy:
                refused += 1
            else:
                lock.release()
    finally:
        out = readers.communicate(timeout=60)[0]
    assert readers.returncode == 0 and int(out.split()[-1]) > 3
    assert attempts > 50 and refused == 0, f"{refused} of {attempts} starts were refused during `{reader}`"


# ------------------------------------------------------------------------------------ a read-only save dir
@pytest.mark.parametrize("reader", [*READERS, ["prune", "--keep_last", "1", "--dry-run"]], ids=" ".join)
def test_readers_work_on_a_read_only_save_dir(tmp_path, save_dir, root_only, reader):
    make_run(save_dir)
    with read_only_view(save_dir, tmp_path / "ro") as view:
        done = cli(reader[0], str(view), *reader[1:])
    assert done.code == 0 and "Traceback" not in done.text, done.text[-2000:]


def test_prune_on_a_read_only_save_dir_is_one_line(tmp_path, save_dir, root_only):
    make_run(save_dir)
    with read_only_view(save_dir, tmp_path / "ro") as view:
        done = cli("prune", str(view), "--keep_last", "1")
    assert_one_line_error(done, 2)
    assert_still_verified(verified(save_dir))


# ----------------------------------------------------------------------- the lock removed under a live writer
WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from adversary import checkpointer
from telepathy.errors import TelepathyError
from telepathy.train_state import TrainState
ckpt = checkpointer(Path(sys.argv[1]), keep_last=1, keep_best=False)
ckpt.save(TrainState(global_step=1), "interval")
print("ready", flush=True)
sys.stdin.readline()
try:
    path = ckpt.save(TrainState(global_step=100), "interval")
    print("committed", path, flush=True)
except TelepathyError as exc:
    print("refused", type(exc).__name__, exc.exit_code, flush=True)
sys.stdin.readline()
"""


def start_writer(save_dir):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(save_dir), HELPERS], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    return writer


def remove(save_dir, how):
    lock, holder = save_dir / ".telepathy.lock", save_dir / ".telepathy.lock.json"
    if how == "rm lock":
        lock.unlink()
    elif how == "rm lock and holder":
        lock.unlink()
        holder.unlink()
    elif how == "rm holder":
        holder.unlink()
    elif how == "replace lock":
        lock.unlink()
        lock.write_bytes(b"")
    elif how == "rm -rf save dir":
        shutil.rmtree(save_dir)
    elif how == "rm -rf save dir, keep holder":
        record = holder.read_bytes()
        shutil.rmtree(save_dir)
        save_dir.mkdir()
        holder.write_bytes(record)


REMOVALS = ["rm lock", "rm lock and holder", "rm holder", "replace lock", "rm -rf save dir",
            "rm -rf save dir, keep holder"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("how", REMOVALS)
def test_a_second_writer_never_shares_the_save_dir_with_a_live_first(save_dir, how):
    writer = start_writer(save_dir)
    try:
        remove(save_dir, how)
        second = None
        try:
            second = checkpointer(save_dir, keep_last=1, keep_best=False)
        except SaveDirBusy:
            pass  # refused while the first is alive: fine
        ours = []
        if second is not None:
            ours = [second.save(TrainState(global_step=s), "interval") for s in (50, 51)]
        writer.stdin.write("\n")
        writer.stdin.flush()
        outcome = writer.stdout.readline().split()
        if second is not None:
            assert outcome[:3] == ["refused", "SaveDirBusy", "75"], f"the first writer went on: {outcome}"
            assert_still_verified(ours[-1:])
            assert not (save_dir / "checkpoints" / "step_00000100").exists()
            assert not [p for p in (save_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
            second.close()
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)


@pytest.mark.slow
def test_prune_is_refused_while_the_writer_whose_lock_file_was_removed_lives(save_dir):
    writer = start_writer(save_dir)
    try:
        remove(save_dir, "rm lock")
        done = cli("prune", str(save_dir), "--keep_last", "1", "--no-keep_best")
        assert_one_line_error(done, 75)
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)


@pytest.mark.slow
def test_the_test_tool_stops_with_75_when_another_run_took_its_save_dir(save_dir):
    tool = subprocess.Popen([sys.executable, "-m", "telepathy.test_preemption", "--save_dir", str(save_dir),
                             "--duration", "60", "--interval", "0.3", "--step_delay", "0.02", "--samples", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (save_dir / "latest").exists():
            assert time.monotonic() < deadline and tool.poll() is None
            time.sleep(0.05)
        remove(save_dir, "rm lock and holder")
        with checkpointer(save_dir, keep_last=1) as second:
            ours = second.save(TrainState(global_step=10**6), "interval")
            out = tool.communicate(timeout=60)[0]
            assert "Traceback" not in out, out[-3000:]
            assert tool.returncode == 75, out[-2000:]
            assert_still_verified([ours])
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()


@pytest.mark.slow
def test_the_test_tool_is_refused_with_75_while_a_writer_whose_lock_file_was_removed_lives(save_dir):
    writer = start_writer(save_dir)
    try:
        remove(save_dir, "rm lock")
        done = program("telepathy.test_preemption", "--save_dir", str(save_dir), "--duration", "1")
        assert_one_line_error(done, 75)
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)


# -------------------------------------------------------------------------------------- damaged holder records
HOLDERS = {
    "binary": b"\x00\xff\xfe garbage \x80",
    "a JSON list": b"[1, 2, 3]",
    "pid a string": json.dumps({"host": os.uname().nodename, "pid": "1"}).encode(),
    "pid 10**30": json.dumps({"host": os.uname().nodename, "pid": 10**30}).encode(),
    "pid -7": json.dumps({"host": os.uname().nodename, "pid": -7}).encode(),
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "since 1e400": b'{"host": "h", "pid": 1, "since": 1e400}',
    "host a list": json.dumps({"host": ["a"], "pid": 1}).encode(),
    "released garbage": json.dumps({"host": os.uname().nodename, "pid": 10**30, "released": "no"}).encode(),
}


@pytest.mark.parametrize("how", sorted(HOLDERS))
def test_a_damaged_holder_record_never_crashes_a_starting_writer(save_dir, how):
    paths = make_run(save_dir)
    (save_dir / ".telepathy.lock.json").write_bytes(HOLDERS[how])
    store = CheckpointStore(save_dir)
    try:
        store.prepare()
    except SaveDirBusy:
        pass  # a record naming a live process may refuse; a crash may not
    finally:
        store.close()
    assert_still_verified(paths)


@pytest.mark.parametrize("how", sorted(HOLDERS))
def test_a_damaged_holder_record_never_crashes_status_of_a_running_writer(save_dir, how):
    make_run(save_dir)
    lock = SaveDirLock(save_dir)
    lock.acquire()
    try:
        (save_dir / ".telepathy.lock.json").write_bytes(HOLDERS[how])
        for args in (["status", str(save_dir)], ["status", str(save_dir), "--json"]):
            done = cli(*args)
            assert done.code == 0 and "Traceback" not in done.text, done.text[-2000:]
            assert "running" in done.out
    finally:
        lock.release()


@pytest.mark.slow
def test_a_huge_holder_record_is_not_read_into_memory(save_dir):
    paths = make_run(save_dir)
    holder = save_dir / ".telepathy.lock.json"
    holder.unlink()
    with open(holder, "wb") as f:
        f.truncate(4 << 30)
    code = (
        "import sys; from telepathy.store.checkpoint_store import CheckpointStore\n"
        "store = CheckpointStore(sys.argv[1]); store.prepare(); store.close(); print('took the lock')\n"
    )
    done = python_code(code, str(save_dir), timeout=60, limit_memory=3 << 30)
    assert_no_traceback(done)
    assert "took the lock" in done.out
    assert_still_verified(paths)
