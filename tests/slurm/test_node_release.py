"""After a save and exit 99 the submit script requeues its own job; the node must then be free within seconds of
the trainer's exit, not held for KillWait (10 s on the local cluster, 30 s by SLURM's default): SLURM signals the
batch shell when it requeues the job, and a shell that still traps SIGTERM and forwards it with scancel (which
SLURM refuses for a job it is ending, and retries) keeps the job COMPLETING until the SIGKILL after KillWait."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from slurm_cluster import log_of, submit, wait_for, wait_for_step

from telepathy.disk.events import read_events

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

RELEASED_WITHIN = 5.0  # seconds from the trainer's exit; a held node takes KillWait (asserted to be longer)


def fields(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(?:^|\s)(JobState|StartTime|SubmitTime|Restarts)=(\S*)", shown))


def seconds(stamp: str) -> float:
    """A time scontrol prints (local time, whole seconds) as a Unix time."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").timestamp()


def trainer_exit(save_dir: Path) -> float:
    """When the supervisor exited 99 (saved, ready to requeue), from its event in events.jsonl."""
    exits = [e for e in read_events(save_dir) if e["event"] == "exit"]
    assert exits and exits[0]["exit_code"] == 99, exits
    return exits[0]["time"]


def requeued(job_id: str) -> dict[str, str]:
    """The job's fields once SLURM has requeued it. A requeued job's SubmitTime is the moment the requeue finished:
    when the job had ended on the node and the node was free again."""
    found = wait_for(lambda: (f := fields(job_id)).get("JobState") == "PENDING" and f, 120, f"job {job_id} requeued")
    assert found["Restarts"] == "1", found
    return found


@pytest.fixture
def kill_wait(cluster):
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    wait = int(re.search(r"^KillWait\s*=\s*(\d+)", shown, re.M).group(1))
    assert wait > RELEASED_WITHIN + 3, f"KillWait={wait}: a held node could not be told from a freed one"
    return wait


@pytest.fixture
def cancel_at_end():
    jobs: list[str] = []
    yield jobs
    for job_id in jobs:  # the requeued job would start again after ~120 s
        subprocess.run(["scancel", job_id])


def test_preemption_the_preempting_job_starts_within_seconds_of_the_trainers_exit(
    kill_wait, cancel_at_end, tmp_path, record_property
):
    job_id = submit(tmp_path, 0.5)
    cancel_at_end.append(job_id)
    wait_for_step(job_id, 3)
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 1"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    cancel_at_end.append(high)
    started = wait_for(lambda: (f := fields(high)).get("JobState") in ("RUNNING", "COMPLETING", "COMPLETED") and f,
                       120, f"the preempting job {high} to start")  # fmt: skip
    exited = trainer_exit(tmp_path / "save")
    assert "was preempted and saved; requeuing it (restart 1" in log_of(job_id)  # the script requeued it itself
    stall = seconds(started["StartTime"]) - exited  # up to 1 s short: StartTime is truncated to whole seconds
    record_property("preempting_job_started_after_s", round(stall, 2))
    assert stall < RELEASED_WITHIN, f"the node was held {stall:.1f} s after the trainer exited (KillWait {kill_wait})"
    released = seconds(requeued(job_id)["SubmitTime"]) - exited
    record_property("node_released_after_s", round(released, 2))
    assert released < RELEASED_WITHIN, f"job {job_id} ended {released:.1f} s after the trainer (KillWait {kill_wait})"


def test_time_limit_warning_the_node_is_free_within_seconds_of_the_trainers_exit(
    kill_wait, cancel_at_end, tmp_path, record_property
):
    job_id = submit(tmp_path, 1.5, "--time=10", "--signal=TERM@60")
    cancel_at_end.append(job_id)
    wait_for_step(job_id, 2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"], check=True)  # the warning is due
    fields_ = requeued(job_id)
    exited = trainer_exit(tmp_path / "save")
    assert "signalled (time limit or by hand) and saved; requeuing it (restart 1" in log_of(job_id)
    released = seconds(fields_["SubmitTime"]) - exited
    record_property("node_released_after_s", round(released, 2))
    assert released < RELEASED_WITHIN, f"job {job_id} ended {released:.1f} s after the trainer (KillWait {kill_wait})"
