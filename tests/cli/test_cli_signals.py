"""The local test tool as a real process: the signal table, exit codes, emergency save, worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import TRAINER, Interrupt, RunResult, run_once, small_run_args

from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = pytest.mark.slow  # real processes (~2 s of torch import each)
REPO = Path(__file__).resolve().parents[2]
SLOW = ("--step_delay", "0.02", "--keep_last", "100")


def reasons(save_dir: Path) -> list[str]:
    return [json.loads((r.path / "manifest.json").read_text())["reason"] for r in CheckpointStore(save_dir).committed()]


def test_sigterm_saves_exits_99_and_rerun_resumes(tmp_path):
    result = RunResult()
    code = run_once(small_run_args(tmp_path, *SLOW), [Interrupt(5, signal.SIGTERM)], result)
    assert code == 99
    assert "SIGTERM: checkpoint committed at step" in result.outputs[-1]
    assert reasons(tmp_path) == ["signal:SIGTERM"]
    step = CheckpointStore(tmp_path).newest_valid()[0].step
    assert step >= 5
    code = run_once(small_run_args(tmp_path, *SLOW), [], result)
    assert code == 0 and f"(global step {step})" in result.outputs[-1]
    assert "training complete at step 36" in result.outputs[-1]


def test_sigint_saves_and_exits_130_without_traceback(tmp_path):
    result = RunResult()
    code = run_once(small_run_args(tmp_path, *SLOW), [Interrupt(3, signal.SIGINT)], result)
    assert code == 130
    assert "Traceback" not in result.outputs[-1] and "KeyboardInterrupt" not in result.outputs[-1]
    assert reasons(tmp_path) == ["signal:SIGINT"]


def test_sigusr1_saves_and_training_continues(tmp_path):
    result = RunResult()
    code = run_once(
        small_run_args(tmp_path, *SLOW), [Interrupt(4, signal.SIGUSR1), Interrupt(20, signal.SIGUSR1)], result
    )
    assert code == 0 and max(result.losses) == 36
    assert reasons(tmp_path) == ["signal:SIGUSR1", "signal:SIGUSR1", "final"]


def test_unexpected_error_writes_emergency_checkpoint(tmp_path):
    result = RunResult()
    code = run_once(small_run_args(tmp_path, "--fail_at_step", "7"), [], result)
    assert code == 1
    assert "emergency checkpoint saved to" in result.outputs[-1] and "injected failure" in result.outputs[-1]
    (emergency,) = (tmp_path / "emergency").iterdir()
    manifest = json.loads((emergency / "manifest.json").read_text())
    assert manifest["reason"] == "emergency" and manifest["step"] == 7 and manifest["emergency"] is True
    code = run_once(small_run_args(tmp_path, "--resume_from", str(emergency)), [], result)
    assert code == 0 and "(global step 7)" in result.outputs[-1]


def test_signals_to_the_whole_process_group_with_workers(tmp_path):
    """SLURM signals every process of a step: trainer and DataLoader workers all get USR1, then TERM."""
    proc = subprocess.Popen(
        [*TRAINER, *small_run_args(tmp_path, "--num_workers", "2", "--step_delay", "0.05", "--keep_last", "100")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 4 "):
            os.killpg(proc.pid, signal.SIGUSR1)
        if line.startswith("step 12 "):
            os.killpg(proc.pid, signal.SIGTERM)
    output = "".join(lines)
    assert proc.wait(timeout=60) == 99, output
    assert "killed by signal" not in output and "Traceback" not in output
    assert reasons(tmp_path) == ["signal:SIGUSR1", "signal:SIGTERM"]


def test_runs_as_a_file_path_and_rejects_bad_values(tmp_path):
    done = subprocess.run(
        [sys.executable, "telepathy/test_preemption.py", "--duration", "1", "--save_dir", str(tmp_path / "a")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[telepathy] no checkpoint") and "\nPID " in done.stdout
    for value in ("-1", "nan", "0"):
        bad = subprocess.run([*TRAINER, "--interval", value], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "--interval/--checkpoint_interval: must be a finite number > 0" in bad.stderr
        assert "Traceback" not in bad.stderr


def test_duration_ends_the_invocation_and_rerun_continues(tmp_path):
    start = time.monotonic()
    args = ["--save_dir", str(tmp_path), "--duration", "2", "--interval", "0.5", "--log_every", "50"]
    first = subprocess.run([*TRAINER, *args], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "duration reached at step" in first.stdout
    assert time.monotonic() - start < 30
    step = CheckpointStore(tmp_path).newest_valid()[0].step
    second = subprocess.run([*TRAINER, *args], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and f"(global step {step})" in second.stdout
