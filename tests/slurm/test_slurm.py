"""The submit script on a real single-node SLURM (scripts/slurm-local.sh): preemption, time-limit warning,
operator requeue and manual save, each finishing bit-identical to an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import RunResult, deep_equal
from slurm_cluster import (
    NUMERICS,
    explain,
    job,
    log_of,
    release_when_requeued,
    submit,
    wait_for,
    wait_for_step,
    wait_until_finished,
)

from telepathy.disk.events import read_events
from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training, uninterrupted and outside SLURM (step delays change timing, never numbers)."""
    save_dir = tmp_path_factory.mktemp("reference")
    done = subprocess.run([sys.executable, "-m", "telepathy.preemptible_training", "--save_dir", str(save_dir),
                           *NUMERICS], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = RunResult()
    for line in done.stdout.splitlines():
        result.record(line)
    return CheckpointStore(save_dir).newest_valid()[0].path, result.losses


def assert_bit_identical(run_dir: Path, job_id: str, reference) -> None:
    result = RunResult()
    for line in log_of(job_id).splitlines():
        result.record(line)
    assert result.replay_mismatches == [] and result.losses == reference[1]
    final = CheckpointStore(run_dir / "save").newest_valid()[0].path
    for part in ("encoder", "adapter_llama", "optimizer"):
        a, b = (torch.load(d / f"{part}.pt", weights_only=True) for d in (reference[0], final))
        assert deep_equal(a, b) == [], part


def restarts_logged(job_id: str) -> list[int]:
    return [int(line.split(" restart ")[1].split()[0]) for line in log_of(job_id).splitlines()
            if line.startswith("[submit") and " restart " in line]  # fmt: skip


def test_partition_preemption_saves_requeues_resumes_bit_identical(cluster, reference, tmp_path):
    job_id = submit(tmp_path, 0.5)
    wait_for_step(job_id, 3)
    subprocess.run(["sbatch", "-p", "high", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 1"], check=True)
    release_when_requeued(job_id)
    final = wait_until_finished(job_id)
    log = log_of(job_id)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", explain(job_id)
    assert restarts_logged(job_id) == [0, 1]
    assert "was preempted and saved; requeuing it (restart 1" in log
    saves = [e for e in read_events(tmp_path / "save") if e["event"] == "save"]
    assert saves[0]["reason"] == "signal:SIGTERM" and saves[-1]["reason"] == "final"
    assert_bit_identical(tmp_path, job_id, reference)


def test_time_limit_warning_saves_and_the_job_requeues_itself(cluster, reference, tmp_path):
    job_id = submit(tmp_path, 1.5, "--time=10", "--signal=TERM@60")
    wait_for_step(job_id, 2)
    # The warning is due once less than 60 s remain; SLURM checks about every 30 s, the run lasts longer.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"], check=True)
    release_when_requeued(job_id, "TimeLimit=10")  # the resumed run gets time to finish
    final = wait_until_finished(job_id)
    log = log_of(job_id)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", explain(job_id)
    assert restarts_logged(job_id) == [0, 1]
    assert "signalled (time limit or by hand) and saved; requeuing it (restart 1" in log
    assert [e["reason"] for e in read_events(tmp_path / "save") if e["event"] == "save"][0] == "signal:SIGTERM"
    assert_bit_identical(tmp_path, job_id, reference)


def test_manual_save_then_operator_requeue_is_not_requeued_twice(cluster, reference, tmp_path):
    job_id = submit(tmp_path, 0.5)
    wait_for_step(job_id, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)  # to the batch shell only
    events = tmp_path / "save"
    wait_for(lambda: any(e.get("reason") == "signal:SIGUSR1" for e in read_events(events)), 60, "the USR1 save")
    assert job(job_id)["JobState"] == "RUNNING"  # saved and kept training
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    release_when_requeued(job_id)
    final = wait_until_finished(job_id)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", explain(job_id)
    assert restarts_logged(job_id) == [0, 1] and "requeuing it (restart" not in log_of(job_id)  # SLURM's requeue only
    exits = [e["exit_code"] for e in read_events(events) if e["event"] == "exit"]
    assert exits == [99, 0]  # the killed job's shell may not live to log it; the supervisor's event does
    assert_bit_identical(tmp_path, job_id, reference)
