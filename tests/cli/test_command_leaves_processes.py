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
        ("{T} {F} 2 98 & sleep 0.5; {T} {F}2 1 1 &", 1),  # a failure is worse than a stop, whatever the order
    ],
    ids=["large", "command-is-a-trainer", "behind-timeout", "failure-beats-stop"],
)
def test_the_runs_exit_code_is_the_worst_of_its_trainers_not_the_shells(tmp_path, shape, expected):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    done = wrapped(tmp_path, shape.format(T=f"{sys.executable} {script}", F=tmp_path / "finished"))
    assert done.returncode == expected, done.stdout


def test_a_trainer_reaped_by_a_subshell_that_exits_0_counts_as_failed(tmp_path):
    """Its code is unknown (the subshell's is its last command's) and it reported no final save: not 0."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    done = wrapped(tmp_path, f"({sys.executable} {script} {tmp_path / 'finished'} 1 4; echo after) &")
    assert done.returncode == 1, done.stdout
    assert "its exit code is unknown and it reported no final save; counted as failed" in done.stdout


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
