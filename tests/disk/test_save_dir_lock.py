"""One writer per save dir: a second writer is refused at once naming the holder; a dead holder's lock is taken
over; the main job refuses before starting its trainer and does not restart a refused one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch import nn

from telepathy.checkpointer import Checkpointer
from telepathy.disk.lock import SaveDirBusy, SaveDirLock
from telepathy.disk.save_dir import HOLDER as HOLDER_NAME

pytestmark = pytest.mark.slow  # real processes
HOLD = "import sys, time; from telepathy.disk.lock import SaveDirLock; lock = SaveDirLock(sys.argv[1]); " \
       "lock.acquire(); print('held', flush=True); time.sleep(600)"  # fmt: skip
MAIN = [sys.executable, "-m", "telepathy.preemptible_training"]


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step_00000007-otherhost-123-abcd"
    stale.mkdir(parents=True)  # another writer's save in progress: the refused one must not clean it up
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SaveDirBusy) as refused:
            Checkpointer(tmp_path, parts={"model": nn.Linear(2, 2)})
        message = str(refused.value)
        assert f"in use by another run (host {socket.gethostname()}, pid {holder.pid}, SLURM job 4242 (array " \
               "task 3), since " in message and "use another --save_dir" in message  # fmt: skip
        assert stale.exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the kernel drops its lock
        holder.wait()
    with Checkpointer(tmp_path, parts={"model": nn.Linear(2, 2)}):
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
        assert not stale.exists()  # now the writer, it removes the dead run's temporary directory


def test_a_killed_holder_not_yet_reaped_does_not_keep_the_save_dir(tmp_path):
    """A whole job SIGKILLed at once (node-local requeue, a container whose init reaps late or never): its trainer
    is a zombie for a while, its pid still answers kill(0) with its start time, but its flock is gone. A new run
    must take the save dir over, not refuse it as 'in use' (and then not run again)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)  # not waited for: a zombie until this test reaps it
        deadline = time.monotonic() + 30
        while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == holder.pid
        with Checkpointer(tmp_path, parts={"model": nn.Linear(2, 2)}):
            assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


LEADER_GONE = (  # the main thread ends (pthread_exit): the leader shows Z, its writer thread goes on
    "import ctypes, sys, threading, time; from telepathy.disk.lock import SaveDirLock; "
    "lock = SaveDirLock(sys.argv[1]); lock.acquire(); threading.Thread(target=time.sleep, args=(600,)).start(); "
    "print('held', flush=True); "
    "ctypes.CDLL(None).pthread_exit(None)"
)


def test_a_holder_whose_main_thread_ended_while_a_thread_runs_still_holds_the_save_dir(tmp_path):
    """Alive: another thread of it may still write. With its lock file removed (so its flock is not seen) a
    newcomer must still be refused, not take over because the leader looks like a zombie."""
    holder = subprocess.Popen([sys.executable, "-c", LEADER_GONE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        deadline = time.monotonic() + 30
        while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / ".telepathy.lock").unlink()
        with pytest.raises(SaveDirBusy):
            Checkpointer(tmp_path, parts={"model": nn.Linear(2, 2)})
    finally:
        holder.kill()
        holder.wait()


FORKING_HOLDER = (
    "import os, sys, time; from telepathy.disk.lock import SaveDirLock; lock = SaveDirLock(sys.argv[1]); "
    "lock.acquire(); child = os.fork()\n"
    "if child == 0:\n"
    "    print('child holds the lock:', lock.held, flush=True); time.sleep(600); os._exit(0)\n"
    "print(child, flush=True); time.sleep(600)"
)


def test_a_child_forked_from_the_writer_does_not_keep_the_lock_when_the_writer_is_killed(tmp_path):
    """A DataLoader worker (forked) outlives its trainer, SIGKILLed by the OOM killer, for a few seconds: the
    restarted trainer must get the save dir at once, not be refused (exit 75, not run again)."""
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    lines = sorted(holder.stdout.readline().strip() for _ in range(2))  # (in either order)
    assert lines[1] == "child holds the lock: False"
    child = int(lines[0])
    try:
        holder.kill()
        holder.wait()
        assert Path(f"/proc/{child}").exists()  # the forked child lives on (and knows it holds no lock)
        with Checkpointer(tmp_path, parts={"model": nn.Linear(2, 2)}):
            assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


def test_one_process_may_open_its_save_dir_twice(tmp_path):
    with Checkpointer(tmp_path, parts={"model": nn.Linear(2, 2)}), Checkpointer(tmp_path, parts={}):
        pass


def test_main_job_refuses_a_busy_save_dir_before_starting_and_never_restarts_a_refused_trainer(tmp_path):
    lock = SaveDirLock(tmp_path / "busy")
    (tmp_path / "busy").mkdir()
    lock.acquire()
    try:
        done = subprocess.run([*MAIN, "--save_dir", str(tmp_path / "busy"), "--", sys.executable, "-c",
                               "print('trainer started')"], capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        lock.release()
    assert done.returncode == 75 and f"pid {os.getpid()}" in done.stdout and "trainer started" not in done.stdout
    refused = subprocess.run([*MAIN, "--save_dir", str(tmp_path / "free"), "--max_restarts", "2", "--",
                              sys.executable, "-c", "raise SystemExit(75)"], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert refused.returncode == 75 and "restart" not in refused.stdout
