"""A Lightning run under ``telepathy.lightning.fit_preemptible`` (tests/helpers/lightning_worker.py: MLP, dropout,
Adam, per-step LR schedule, shuffled data with a random augmentation, validation each epoch), interrupted by real
signals in real processes and resumed: every step's loss and the final weights, optimizer and LR schedule must
equal those of an uninterrupted run, bit for bit. 3 epochs x 12 batches = 36 steps (2 ranks: 6 batches each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from lightning_runs import WORKER, Run, assert_same_training, losses_in, reference_run, run_worker

pytestmark = pytest.mark.slow


def saves(save_dir) -> list[tuple[int, str]]:
    events = [json.loads(line) for line in (save_dir / "events.jsonl").read_text().splitlines()]
    return [(e["step"], e["reason"]) for e in events if e["event"] == "save"]


def test_sigterm_mid_epoch_exits_99_and_the_resume_is_bit_identical(tmp_path, lightning_reference):
    first = run_worker(tmp_path, "--val", "--delay", "0.1", signal_at_step=(5, signal.SIGTERM))
    assert first.code == 99, first.output[-3000:]
    stopped = max(first.steps())
    assert saves(tmp_path) == [(stopped, "signal:SIGTERM")]  # saved at the step boundary where it stopped
    assert "SIGTERM at step" in first.output and "Traceback" not in first.output
    second = run_worker(tmp_path, "--val")
    assert second.code == 0, second.output[-3000:]
    assert second.steps() == list(range(stopped + 1, 37))  # nothing lost, nothing replayed
    assert_same_training(lightning_reference, tmp_path, first, second)


def test_usr1_saves_and_continues_then_term_and_int_stop_with_their_codes(tmp_path, lightning_reference):
    """Signals at known steps (the worker signals itself right after printing the step): SIGUSR1 at step 3 saves
    and trains on; SIGTERM at step 12, the last batch of epoch 0 with a validation due after it, stops (99); the
    resumed run gets SIGINT at step 20 (130); the third run completes."""
    first = run_worker(tmp_path, "--val", "--signal_at", "3:USR1", "--signal_at", "12:TERM")
    assert first.code == 99 and first.steps() == list(range(1, 13)), first.output[-3000:]
    assert saves(tmp_path) == [(3, "signal:SIGUSR1"), (12, "signal:SIGTERM")]
    assert "stopping before the validation due after step 12" in first.output
    second = run_worker(tmp_path, "--val", "--signal_at", "20:INT")
    assert second.code == 130 and second.steps() == list(range(13, 21)), second.output[-3000:]
    assert "KeyboardInterrupt" not in second.output
    third = run_worker(tmp_path, "--val")
    assert third.code == 0 and third.steps() == list(range(21, 37))
    assert saves(tmp_path)[-1] == (36, "final")
    assert_same_training(lightning_reference, tmp_path, first, second, third)


def test_sigkill_resumes_from_the_last_checkpoint_and_replays_bit_identically(tmp_path, lightning_reference):
    first = run_worker(tmp_path, "--val", "--every_steps", "5", "--delay", "0.1", signal_at_step=(13, signal.SIGKILL))
    assert first.code == -signal.SIGKILL
    last_saved = saves(tmp_path)[-1][0]
    assert last_saved % 5 == 0 and last_saved < max(first.steps())
    second = run_worker(tmp_path, "--val", "--every_steps", "5")
    assert second.code == 0, second.output[-3000:]
    assert second.steps() == list(range(last_saved + 1, 37))  # the steps after the last save are replayed
    assert_same_training(lightning_reference, tmp_path, first, second)  # ... with the same losses


def test_per_step_snapshots_under_the_wrapper_lose_at_most_the_step_in_flight_to_a_sigkill(
    tmp_path, lightning_reference
):
    """``snapshot_every_step`` with the supervising wrapper: the trainer SIGKILLed after step 13, the wrapper commits
    its newest snapshot and restarts it, and the run goes on from the step in flight with the same losses. (From a
    self-review: the Lightning checkpointer's files did not take the per-step snapshot's arguments, so this
    combination crashed at the first step.)"""
    command = [sys.executable, "-m", "telepathy.preemptible_training", "--save_dir", str(tmp_path), "--max_restarts",
               "1", "--restart_backoff", "0.1", "--", sys.executable, str(WORKER), str(tmp_path), "--val", "--delay",
               "0.05", "--snapshot_every_step"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines, killed_after = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if killed_after is None and line.startswith("step 13 rank 0 "):
                trainer = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
                os.kill(trainer, signal.SIGKILL)
                killed_after = 13
        code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    output = "".join(lines)
    assert code == 0 and killed_after == 13, output[-3000:]
    assert "snapshot from shared memory" in output and "Traceback" not in output, output[-3000:]
    first, second = output.split("snapshot from shared memory", 1)
    resumed = min(step for step, rank in losses_in(second))
    assert resumed in (13, 14), output[-3000:]  # step 13 printed, its boundary (snapshot) done or not yet
    runs = [Run(0, first, losses_in(first)), Run(0, second, losses_in(second))]
    assert_same_training(lightning_reference, tmp_path, *runs)


def test_ddp_two_ranks_stop_together_and_resume_bit_identically(tmp_path, tmp_path_factory):
    """strategy='ddp' on CPU (gloo), 2 processes started by Lightning's launcher; SIGTERM reaches rank 0 only."""
    reference = reference_run(tmp_path_factory.mktemp("ddp-reference"), "--devices", "2")
    first = run_worker(tmp_path, "--devices", "2", "--delay", "0.2", signal_at_step=(2, signal.SIGTERM))
    assert first.code == 99, first.output[-3000:]
    assert first.steps(0) == first.steps(1) and max(first.steps(0)) < 18  # both ranks stopped at the same step
    assert [r for _, r in saves(tmp_path)] == ["signal:SIGTERM"]
    second = run_worker(tmp_path, "--devices", "2")
    assert second.code == 0, second.output[-3000:]
    assert second.steps(1) == list(range(max(first.steps(1)) + 1, 19))
    assert_same_training(reference, tmp_path, first, second)
