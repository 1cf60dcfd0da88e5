"""Signals at bad moments, as real signals to real processes: a burst of 1000 SIGUSR1, SIGTERM (twice) during
a save, SIGTERM while the trainer is still importing torch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from harness import TRAINER, RunResult, deep_equal, load_checkpoint_files, run_once, small_run_args

from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = pytest.mark.slow
SLOW = ("--step_delay", "0.02")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("reference")
    result = RunResult()
    assert run_once(small_run_args(save_dir, *SLOW), [], result) == 0
    return result.losses, load_checkpoint_files(CheckpointStore(save_dir).newest_valid()[0].path)


def assert_matches(save_dir, result, reference):
    assert result.replay_mismatches == [] and result.losses == reference[0]
    assert deep_equal(load_checkpoint_files(CheckpointStore(save_dir).newest_valid()[0].path), reference[1]) == []


def test_a_thousand_sigusr1_in_a_second_are_coalesced(tmp_path, reference):
    proc = subprocess.Popen([*TRAINER, *small_run_args(tmp_path, *SLOW)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def burst():
        for _ in range(1000):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.001)

    result, sender, lines = RunResult(), threading.Thread(target=burst), []
    for line in proc.stdout:
        lines.append(line)
        result.record(line)
        if line.startswith("step 3 ") and not sender.is_alive():
            sender.start()
    sender.join()
    assert proc.wait(timeout=60) == 0, "".join(lines[-20:])
    saves = [line for line in lines if "(reason: signal:SIGUSR1)" in line]
    burst_steps = {int(line.split()[1]) for line in lines if line.startswith("step ")} & set(range(3, 37))
    assert 1 <= len(saves) <= len(burst_steps)  # at most one save per step boundary, never one per signal
    assert_matches(tmp_path, result, reference)


def test_sigterm_twice_during_a_save_finishes_that_save_and_exits_99(tmp_path, reference):
    env = {"TELEPATHY_TEST_SAVE_STEP_PAUSE": "0.1"}  # each durability step pauses: a save lasts ~1 s
    proc = subprocess.Popen([*TRAINER, *small_run_args(tmp_path, *SLOW)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})  # fmt: skip
    result = RunResult()
    for line in proc.stdout:
        result.record(line)
        if line.startswith("step 5 "):
            break
    proc.send_signal(signal.SIGUSR1)  # starts a save at the next step boundary
    time.sleep(0.4)
    proc.send_signal(signal.SIGTERM)  # during it
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # and again
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 99, rest
    for line in rest.splitlines():
        result.record(line)
    assert "Traceback" not in rest and len(re.findall(r"checkpoint committed", rest)) >= 1
    store = CheckpointStore(tmp_path)
    assert store.latest_pointer() == store.newest_valid()[0].path
    assert run_once(small_run_args(tmp_path, *SLOW), [], result) == 0
    assert_matches(tmp_path, result, reference)


def test_sigterm_while_the_trainer_is_still_importing_is_not_lost(tmp_path):
    command = [sys.executable, "-m", "telepathy.latentwire.train", "--save_dir", str(tmp_path), "--samples", "16",
               "--epochs", "1", "--log_every", "1"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # importing torch and transformers takes seconds
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 99, output
    assert "step_00000001 (reason: signal:SIGTERM)" in output  # saved at its first step boundary


@pytest.fixture
def cpu_burners():
    """Two busy processes beside the trainer (this machine has 2 cores): the end of training, the final save and
    the interpreter's teardown stretch out and interleave with the signals, as on a loaded node."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_burst_across_the_end_of_training_never_ends_a_process_by_a_signal(tmp_path, cpu_burners, signum):
    """From step 33 of 36 until the wrapper has exited — through the last steps, the final save, the trainer's and
    the wrapper's exits and their interpreters' teardown — a signal every millisecond to the wrapper, which forwards
    each to the trainer. The exit code is one of the documented ones (0 complete; 99 a stop with its checkpoint),
    never negative (a default action killing a finished run)."""
    command = [sys.executable, "-m", "telepathy.preemptible_training", "--save_dir", str(tmp_path), "--max_restarts",
               "0", "--", *TRAINER, *small_run_args(tmp_path, *SLOW)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent = [0]

    def burst():
        while proc.poll() is None:  # poll() first: never a signal to a reaped (reusable) pid
            proc.send_signal(signum)
            sent[0] += 1
            time.sleep(0.001)

    sender, lines = threading.Thread(target=burst), []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 33 ") and not sender.is_alive():
            sender.start()
    code = proc.wait(timeout=120)
    sender.join()
    assert sent[0] > 0 and code in (0, 99), (code, "".join(lines[-20:]))
    if code == 99:  # stopped before the end: a checkpoint of the stop was committed
        assert CheckpointStore(tmp_path).newest_valid() is not None
