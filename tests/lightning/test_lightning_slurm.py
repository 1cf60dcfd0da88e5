"""The Lightning worker (tests/helpers/lightning_worker.py) as COMMAND of the real submit script on the local SLURM
(scripts/slurm-local.sh): partition preemption, the time-limit warning, and an operator's SIGUSR1 then
``scontrol requeue``. Each job is requeued, finishes, and trained bit-identically to an uninterrupted run. The step
delay is read from a file, so the first start is slow enough to be signalled and the resumed one fast."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning_runs import WORKER, Run, assert_same_training, losses_in
from slurm_cluster import SUBMIT, job, log_of, release_when_requeued, wait_for, wait_until_finished

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def submit(run_dir: Path, delay: float, *sbatch_args: str) -> str:
    (run_dir / "delay").write_text(str(delay))
    command = [sys.executable, str(WORKER), str(run_dir / "save"), "--val", "--delay_file", str(run_dir / "delay")]
    env = {**os.environ, "SAVE_DIR": str(run_dir / "save"), "PYTHON": sys.executable, "COMMAND": " ".join(command)}
    done = subprocess.run(["sbatch", "--parsable", "-p", "low", "-c", "2", *sbatch_args, str(SUBMIT)], cwd=run_dir,
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip().split(";")[0]


def wait_for_step(job_id: str, step: int, timeout: float = 120) -> None:
    wait_for(lambda: f"\nstep {step} rank 0 " in log_of(job_id), timeout, f"job {job_id} to log step {step}")


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "save" / "events.jsonl").read_text().splitlines()]


def stops(run_dir: Path) -> list[int]:
    """The exit codes the trainer chose when a signal stopped it (its own record: 99 after a committed save)."""
    return [e["exit_code"] for e in events(run_dir) if e["event"] == "preempt"]


def finished_bit_identical(run_dir: Path, job_id: str, reference) -> str:
    """Speed the resumed start up, wait for the job to end; it must have completed after one requeue that lost and
    replayed no step, with every loss and the final state of the uninterrupted run."""
    (run_dir / "delay").write_text("0")
    final = wait_until_finished(job_id)
    log = log_of(job_id)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, log[-3000:])
    starts = re.split(r"^\[submit [^\n]* restart \d+ [^\n]*$", log, flags=re.MULTILINE)[1:]
    assert len(starts) == 2, log[-3000:]
    first, second = (Run(0, text, losses_in(text)) for text in starts)
    assert second.steps() == list(range(max(first.steps()) + 1, 37))  # saved where it stopped: 0 lost or replayed
    assert_same_training(reference, run_dir / "save", first, second)
    return log


def test_partition_preemption_saves_requeues_and_resumes_bit_identically(cluster, lightning_reference, tmp_path):
    job_id = submit(tmp_path, 0.3)
    wait_for_step(job_id, 3)
    subprocess.run(["sbatch", "-p", "high", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 1"], check=True)
    release_when_requeued(job_id)
    log = finished_bit_identical(tmp_path, job_id, lightning_reference)
    assert "exit 99 rank 0" in log and stops(tmp_path) == [99]
    assert "was preempted and" in log and "requeuing it (restart 1" in log
    saves = [e["reason"] for e in events(tmp_path) if e["event"] == "save"]
    assert saves[0] == "signal:SIGTERM" and saves[-1] == "final"


def test_time_limit_warning_saves_and_the_job_requeues_itself(cluster, lightning_reference, tmp_path):
    job_id = submit(tmp_path, 1.2, "--time=10", "--signal=TERM@60")
    wait_for_step(job_id, 2)
    # The warning is due once less than 60 s remain; SLURM checks about every 30 s, the run lasts longer.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"], check=True)
    release_when_requeued(job_id, "TimeLimit=10")  # the resumed run gets time to finish
    log = finished_bit_identical(tmp_path, job_id, lightning_reference)
    assert "exit 99 rank 0" in log and stops(tmp_path) == [99]
    assert "signalled (time limit or by hand) and" in log and "requeuing it (restart 1" in log
    assert [e["reason"] for e in events(tmp_path) if e["event"] == "save"][0] == "signal:SIGTERM"


def test_operator_usr1_saves_then_scontrol_requeue_is_not_requeued_twice(cluster, lightning_reference, tmp_path):
    job_id = submit(tmp_path, 0.3)
    wait_for_step(job_id, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)  # to the batch shell only
    wait_for(lambda: any(e.get("reason") == "signal:SIGUSR1" for e in events(tmp_path)), 60, "the USR1 save")
    assert job(job_id)["JobState"] == "RUNNING"  # saved and kept training
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    release_when_requeued(job_id)
    log = finished_bit_identical(tmp_path, job_id, lightning_reference)
    assert "requeuing it (restart" not in log  # SLURM's requeue only
    assert stops(tmp_path) == [99]
