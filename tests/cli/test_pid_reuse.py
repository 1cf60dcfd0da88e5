"""A pid names a process only until it is reaped; the kernel then gives it to the next process it starts (pid_max
is often 32768). The supervisor must never signal or kill a process that merely got a pid of the run's: here a
pid is really given to a bystander (as root, through /proc/sys/kernel/ns_last_pid, the way CRIU restores pids)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from telepathy.process_tree import JobTree, Process

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
pytestmark = pytest.mark.skipif(not os.access(NS_LAST_PID, os.W_OK), reason="needs root: ns_last_pid to reuse a pid")


def start_with_pid(pid: int, argv: list[str], **kwargs) -> subprocess.Popen:
    """``argv`` started as process ``pid`` (free: its process was reaped); skips when another process keeps taking
    it first (a busy machine)."""
    for _ in range(50):
        NS_LAST_PID.write_text(str(pid - 1))
        proc = subprocess.Popen(argv, **kwargs)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
        if Path(f"/proc/{pid}").exists():
            break  # taken by some other process meanwhile
    pytest.skip(f"could not start a process as pid {pid}")


def gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.02)


def test_a_process_whose_pid_was_given_to_another_is_never_signalled():
    first = subprocess.Popen(["sleep", "300"], start_new_session=True)
    held = Process.of(first.pid)
    assert held.running() and held.is_current()
    time.sleep(0.05)  # (start times count in 10 ms ticks; a real reuse comes after the pid space wrapped round)
    first.kill()
    first.wait()
    other = start_with_pid(first.pid, ["sleep", "300"], start_new_session=True)  # leads a group of that number too
    try:
        assert not held.is_current() and not held.running()
        assert held.signal(signal.SIGTERM) is False
        assert held.signal_group(signal.SIGTERM) is False
        tree = JobTree()
        try:
            assert tree.members(held) == set()
        finally:
            tree.close()
        time.sleep(0.2)
        assert other.poll() is None, "the process that got the pid was signalled"
        assert Process.of(other.pid).running()  # (the control: the same checks see the one that has it now)
        assert Process.of(other.pid).signal(0) is True
    finally:
        other.kill()
        other.wait()


AWARE_THEN_GONE = textwrap.dedent("""
    import os, sys
    from telepathy import training_signals
    training_signals.install_signal_handlers()  # shakes hands with the supervisor
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
""")


@pytest.mark.slow
def test_a_trainer_that_ended_behind_a_shell_is_not_signalled_under_a_pid_given_to_another(tmp_path):
    """The trainer shook hands and ended; its shell goes on. The trainer's pid goes to a bystander. A SIGTERM to
    the wrapper then goes to the shell's group (no trainer is left), not to the bystander, and the run ends with
    the shell rather than waiting for the bystander."""
    script, pid_file = tmp_path / "aware.py", tmp_path / "trainer.pid"
    script.write_text(AWARE_THEN_GONE)
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "telepathy.preemptible_training", "--save_dir", str(tmp_path / "run"),
         "--grace_period", "20", "--", "sh", "-c", f"{sys.executable} {script} {pid_file}; sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    bystander = None
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert wrapper.poll() is None and time.monotonic() < deadline, wrapper.stdout.read()
            time.sleep(0.05)
        trainer = int(pid_file.read_text())
        gone(trainer)  # ended, and reaped by the shell
        bystander = start_with_pid(trainer, ["sleep", "300"])
        wrapper.send_signal(signal.SIGTERM)
        try:
            out, _ = wrapper.communicate(timeout=15)  # (with the shell: not at the 20 s grace expiry)
        except subprocess.TimeoutExpired:
            wrapper.kill()
            pytest.fail(f"the wrapper went on after its shell ended (waiting for the bystander? alive: "
                        f"{bystander.poll() is None}):\n{wrapper.communicate()[0]}")  # fmt: skip
        assert bystander.poll() is None, f"the bystander that got the trainer's pid was signalled:\n{out}"
        assert "grace period" not in out, out
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        if bystander is not None:
            bystander.kill()
            bystander.wait()
