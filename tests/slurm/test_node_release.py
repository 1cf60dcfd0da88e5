"""The node is free within seconds of the trainer's exit, not held for KillWait (10 s on the local cluster, 30 s by
SLURM's default). When SLURM ends or requeues a job it sends SIGTERM to the batch shell too (the script's own
requeue after exit 99 included); a shell that still trapped SIGTERM then forwarded it with scancel, which SLURM
refuses for a job it is ending ("try again later", retried after 5 s, 6 s, ...), and the job stayed COMPLETING
until the SIGKILL after KillWait."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from slurm_cluster import log_of, submit, wait_for, wait_for_step

from telepathy.disk.events import read_events

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

RELEASED_WITHIN = 5.0  # seconds after the trainer's exit; a held node takes KillWait (asserted to be longer)


def fields(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(?:^|\s)(JobState|StartTime|SubmitTime|Restarts)=(\S*)", shown))


def seconds(stamp: str) -> float:
    """A time scontrol prints (local time, whole seconds: up to 1 s early) as a Unix time."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").timestamp()


def trainer_exit(save_dir: Path) -> float:
    """When the supervisor exited 99 (saved, ready to requeue), from its event in events.jsonl."""
    exits = [e for e in read_events(save_dir) if e["event"] == "exit"]
    assert exits and exits[0]["exit_code"] == 99, exits
    return exits[0]["time"]


def released_after(job_id: str, save_dir: Path) -> float:
    """Seconds from the trainer's exit until SLURM had requeued the job. A requeued job's SubmitTime is the moment
    the requeue finished: the job had ended on the node and the node was free."""
    requeued = wait_for(lambda: (f := fields(job_id)).get("JobState") == "PENDING" and f, 120, f"{job_id} requeued")
    assert requeued["Restarts"] == "1", requeued
    return seconds(requeued["SubmitTime"]) - trainer_exit(save_dir)


@pytest.fixture
def kill_wait(cluster):
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    wait = int(re.search(r"^KillWait\s*=\s*(\d+)", shown, re.M).group(1))
    assert wait > RELEASED_WITHIN + 3, f"KillWait={wait}: a held node could not be told from a free one"
    return wait


@pytest.fixture
def jobs():
    """Job ids to cancel at the end (a requeued job would start again after ~120 s)."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id])


@pytest.fixture
def slow_launcher(tmp_path) -> str:
    """sbatch option: PYTHON is a launcher that returns 3 s after `python -m telepathy.slurm requeue` (as a
    container launcher or a loaded node may), so SLURM's SIGTERM for the requeue always finds the batch shell still
    running, as on a real cluster, and not only sometimes, as on this fast local one."""
    launcher, python = tmp_path / "python", shlex.quote(sys.executable)
    launcher.write_text(f"""#!/bin/bash
if [ "${{1:-}} ${{2:-}}" = "-m telepathy.slurm" ]; then
    {python} "$@"
    code=$?
    sleep 3
    exit $code
fi
exec {python} "$@"
""")
    launcher.chmod(0o755)
    return f"--export=ALL,PYTHON={launcher}"


def test_preemption_the_preempting_job_starts_within_seconds_of_the_trainers_exit(
    kill_wait, jobs, slow_launcher, tmp_path
):
    jobs.append(submit(tmp_path, 0.5, slow_launcher))
    wait_for_step(jobs[0], 3)
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 1"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    jobs.append(high)
    started = wait_for(lambda: (f := fields(high)).get("JobState") in ("RUNNING", "COMPLETING", "COMPLETED") and f,
                       120, f"the preempting job {high} to start")  # fmt: skip
    stall = seconds(started["StartTime"]) - trainer_exit(tmp_path / "save")
    print(f"preempting job started {stall:.2f} s after the trainer's exit")
    assert "was preempted and saved; requeuing it (restart 1" in log_of(jobs[0])  # requeued by the script
    assert stall < RELEASED_WITHIN, f"the preempting job started {stall:.1f} s after the trainer's exit"
    released = released_after(jobs[0], tmp_path / "save")
    print(f"node free {released:.2f} s after the trainer's exit")
    assert released < RELEASED_WITHIN, f"job {jobs[0]} ended {released:.1f} s after the trainer (KillWait {kill_wait})"


def test_time_limit_warning_the_node_is_free_within_seconds_of_the_trainers_exit(
    kill_wait, jobs, slow_launcher, tmp_path
):
    jobs.append(submit(tmp_path, 1.5, "--time=10", "--signal=TERM@60", slow_launcher))
    wait_for_step(jobs[0], 2)
    subprocess.run(["scontrol", "update", f"JobId={jobs[0]}", "TimeLimit=1"], check=True)  # the warning is due
    released = released_after(jobs[0], tmp_path / "save")
    print(f"node free {released:.2f} s after the trainer's exit")
    assert "signalled (time limit or by hand) and saved; requeuing it (restart 1" in log_of(jobs[0])
    assert released < RELEASED_WITHIN, f"job {jobs[0]} ended {released:.1f} s after the trainer (KillWait {kill_wait})"


def test_operator_requeue_the_node_is_free_within_seconds_of_the_trainers_exit(kill_wait, jobs, tmp_path):
    """SLURM's SIGTERM reaches the shell while the trainer is still saving: forwarding it must not keep the shell
    from seeing the trainer exit."""
    jobs.append(submit(tmp_path, 0.5))
    wait_for_step(jobs[0], 3)
    subprocess.run(["scontrol", "requeue", jobs[0]], check=True)
    released = released_after(jobs[0], tmp_path / "save")
    print(f"node free {released:.2f} s after the trainer's exit")
    assert "requeuing it (restart" not in log_of(jobs[0])  # SLURM's requeue only
    assert released < RELEASED_WITHIN, f"job {jobs[0]} ended {released:.1f} s after the trainer (KillWait {kill_wait})"
