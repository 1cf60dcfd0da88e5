"""A command that ends and leaves processes running: a trainer still starting behind a forking shell
(``sh -c "train.py &"``) is waited for, supervised, and its exit code is the run's (the shell's 0 would claim a
finished run), also when the trainer is large (its exit takes time), sits behind `timeout` or a subshell, or runs
beside a trainer that is the command itself; processes that never shake hands are named and left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow  # real processes
MAIN = [sys.executable, "-m", "telepathy.preemptible_training"]

TRAINER = textwrap.dedent("""
    import sys, time
    from telepathy import training_signals
    training_signals.install_signal_handlers()
    held = b"x" * (int(sys.argv[4]) << 20) if len(sys.argv) > 4 else b""  # (pages touched: a slow exit)
    print("trainer up", flush=True)
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if training_signals.should_exit_training():
            print("trainer stopping", flush=True)
            sys.exit(training_signals.EXIT_STOPPED_UNSAVED)
    open(sys.argv[1], "w").close()
    sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 5)
""")


def wrapped(tmp_path, shell_command: str, *flags: str) -> subprocess.CompletedProcess:
    log = tmp_path / "out.log"
    with open(log, "w") as out:  # (a file: a process left behind may keep a pipe open)
        command = [*MAIN, "--save_dir", str(tmp_path / "run"), "--max_restarts", "0", *flags, "--", "bash", "-c",
                   shell_command]  # fmt: skip
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    done.stdout = log.read_text()
    return done


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("{T} {F} 1 5 300 &", 5),  # a large trainer: its threads take a while to go after it is a zombie
        ("{T} {F} 3 0 & exec {T} {F}2 1 7", 7),  # the command is a trainer too, and fails first
        ("timeout 600 {T} {F} 1 3 &", 3),  # `timeout` reaps the trainer; its code is the trainer's
        ("timeout 600 {T} {F} 1 0 &", 0),  # ... also when that is 0
        ("({T} {F} 1 4; exit $?) &", 4),  # a subshell that passes the trainer's code on
        ("{T} {F} 2 98 & sleep 0.5; {T} {F}2 1 1 &", 1),  # a failure is worse than a stop, whatever the order
    ],
    ids=["large", "command-is-a-trainer", "behind-timeout", "behind-timeout-0", "subshell", "failure-beats-stop"],
)
def test_the_runs_exit_code_is_the_worst_of_its_trainers_not_the_shells(tmp_path, shape, expected):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    done = wrapped(tmp_path, shape.format(T=f"{sys.executable} {script}", F=tmp_path / "finished"))
    assert done.returncode == expected, done.stdout


def test_a_trainer_whose_code_nobody_passes_on_counts_as_failed_and_its_subshell_is_not_waited_for(tmp_path):
    """The subshell that reaped it goes on (30 s): it is waited for a few seconds only, then the trainer's code is
    unknown and it reported no final save: not 0."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    started = time.monotonic()
    done = wrapped(tmp_path, f"({sys.executable} {script} {tmp_path / 'finished'} 1 0; sleep 30) &")
    assert done.returncode == 1, done.stdout
    assert "its exit code is unknown and it reported no final save; counted as failed" in done.stdout
    assert time.monotonic() - started < 25, done.stdout


def test_a_command_that_fails_early_is_not_held_by_what_it_started(tmp_path):
    """A trainer that dies at once beside a daemon it started: exit 2 now, the daemon named, not waited for."""
    pid_file = tmp_path / "daemon.pid"
    done = wrapped(tmp_path, f"sleep 300 >/dev/null 2>&1 & echo $! > {pid_file}; exit 2", "--grace_period", "4")
    sleeper = int(pid_file.read_text())
    try:
        assert done.returncode == 2, done.stdout
        assert f"{sleeper} (sleep)" in done.stdout and "waiting for them" not in done.stdout, done.stdout
    finally:
        os.kill(sleeper, signal.SIGKILL)


def test_a_stop_does_not_wait_for_the_subshell_of_a_trainer_that_stopped(tmp_path):
    script, log = tmp_path / "trainer.py", tmp_path / "out.log"
    script.write_text(TRAINER)
    with open(log, "w") as out:  # (a file: the subshell's sleep keeps a pipe open)
        wrapper = subprocess.Popen(
            [*MAIN, "--save_dir", str(tmp_path / "run"), "--grace_period", "30", "--", "bash", "-c",
             f"({sys.executable} {script} {tmp_path / 'finished'} 60 0; sleep 60) &"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "trainer up" not in log.read_text():
            assert wrapper.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.3)
        stopped = time.monotonic()
        wrapper.send_signal(signal.SIGTERM)
        code = wrapper.wait(timeout=60)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    said = log.read_text()
    assert code == 98 and "grace period" not in said, said
    assert time.monotonic() - stopped < 20, said  # (the subshell's few seconds, not the 30 s grace period)


def test_a_command_that_ends_in_start_up_is_waited_for_with_what_it_left_and_their_exit_code(tmp_path):
    started = time.monotonic()
    done = wrapped(tmp_path, "(sleep 4; exit 7) &", "--grace_period", "4")  # start-up: 2 s
    assert done.returncode == 7, done.stdout
    assert time.monotonic() - started >= 4
    assert "waiting for them (a trainer still starting?)" in done.stdout, done.stdout


def test_a_trainer_still_starting_behind_a_forking_shell_is_supervised_and_its_exit_code_is_the_runs(tmp_path):
    script, finished = tmp_path / "trainer.py", tmp_path / "finished"
    script.write_text(TRAINER)
    done = subprocess.run(
        [*MAIN, "--save_dir", str(tmp_path / "run"), "--max_restarts", "0", "--", "sh", "-c",
         f"(sleep 1; exec {sys.executable} {script} {finished} 2 5 300) &"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )  # fmt: skip
    assert finished.exists(), f"the wrapper ended before the trainer did:\n{done.stdout}"
    assert done.returncode == 5, done.stdout  # the trainer's exit code, not the shell's 0
    assert "trainer failed (exit code 5)" in done.stdout, done.stdout


def test_a_stop_signal_reaches_a_trainer_handed_over_by_a_forking_shell(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    wrapper = subprocess.Popen(
        [*MAIN, "--save_dir", str(tmp_path / "run"), "--", "sh", "-c",
         f"(sleep 1; exec {sys.executable} {script} {tmp_path / 'finished'} 60) &"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert wrapper.stdout.readline().strip() == "trainer up"
        time.sleep(0.3)  # (its handshake reached the wrapper)
        wrapper.send_signal(signal.SIGTERM)
        out, _ = wrapper.communicate(timeout=60)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert "trainer stopping" in out and wrapper.returncode == 98, out  # stopped, nothing saved: not 0


def test_processes_a_command_leaves_without_shaking_hands_are_named_and_left_alone(tmp_path):
    pid_file, log = tmp_path / "sleeper.pid", tmp_path / "out.log"
    started = time.monotonic()
    with open(log, "w") as out:  # (a file: the sleeper keeps a pipe open for 300 s)
        code = subprocess.run(
            [*MAIN, "--save_dir", str(tmp_path / "run"), "--grace_period", "4", "--", "sh", "-c",
             f"sleep 300 < /dev/null > /dev/null 2>&1 & echo $! > {pid_file}; sleep 3"],  # ends after start-up
            stdout=out, stderr=subprocess.STDOUT, timeout=120,
        ).returncode  # fmt: skip
    sleeper, said = int(pid_file.read_text()), log.read_text()
    try:
        assert code == 0, said
        assert f"left 1 process(es) running that did not install telepathy's handlers: {sleeper} (sleep)" in said, said
        assert time.monotonic() - started >= 3
        os.kill(sleeper, 0)  # not stopped
    finally:
        try:
            os.kill(sleeper, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_what_an_earlier_run_left_is_not_counted_in_a_restarts_exit_code(tmp_path):
    """The first run fails and leaves a process that ends (9) during the restart: the restart's code is its own."""
    marker = tmp_path / "first"
    done = wrapped(
        tmp_path,
        f"if [ ! -e {marker} ]; then touch {marker}; (sleep 3.5; exit 9) & sleep 2.5; exit 1; fi; sleep 2",
        "--grace_period", "4", "--max_restarts", "1", "--restart_backoff", "0.1",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert "left 2 process(es) running" in done.stdout, done.stdout  # (the subshell and its sleep)


HALF_GONE = "import ctypes, threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); " + (
    "ctypes.CDLL(None).pthread_exit(None)"  # its main thread ends: a zombie leader whose other thread runs on
)


def test_a_process_whose_main_thread_ended_while_another_runs_does_not_hold_the_wrapper(tmp_path):
    """Its exit status cannot be collected while its last thread lives (a thread stuck in the kernel looks the
    same): the wrapper waits a few seconds, not for ever."""
    script, half, pid_file = tmp_path / "trainer.py", tmp_path / "half.py", tmp_path / "half.pid"
    script.write_text(TRAINER)
    half.write_text(HALF_GONE)
    started = time.monotonic()
    done = wrapped(tmp_path, f"{sys.executable} {half} & echo $! > {pid_file}; exec {sys.executable} {script} "
                             f"{tmp_path / 'finished'} 2 0")  # fmt: skip
    try:
        assert done.returncode == 0, done.stdout
        assert time.monotonic() - started < 40, done.stdout
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
