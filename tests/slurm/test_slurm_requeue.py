"""The requeue policy run by the submit script after exit 99, and its command line."""

from __future__ import annotations

import os
import subprocess
import sys

from telepathy.slurm import decide, job_reference, parse_job_fields

# Real `scontrol show job -o` output from the local cluster (SLURM 22.05), shortened.
SHOWN = (
    "JobId=7 JobName=low3.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901753 Nice=0 "
    "Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:03 TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-11-28T11:48:33 "
    "EndTime=Unknown Deadline=N/A PreemptEligibleTime=2026-11-28T11:48:34 PreemptTime=2026-11-28T11:48:37 "
    "SuspendTime=None SecsPreSuspend=0 Partition=low"
)
JOB = {"SLURM_JOB_ID": "7"}


def test_fields_are_read_from_real_scontrol_output():
    assert parse_job_fields(SHOWN) == {
        "JobState": "RUNNING", "Requeue": "1", "Restarts": "0", "PreemptTime": "2026-11-28T11:48:37"
    }  # fmt: skip


def test_a_running_job_that_saved_is_requeued_once_by_itself():
    preempted = decide(99, JOB, parse_job_fields(SHOWN), max_requeues=5)
    assert preempted.requeue
    assert preempted.reason == "job 7 was preempted and saved; requeuing it (restart 1, at most 5)"
    time_limit = decide(99, {**JOB, "SLURM_RESTART_COUNT": "2"}, {"JobState": "RUNNING", "PreemptTime": "None"}, 5)
    assert time_limit.requeue and "signalled (time limit or by hand) and saved; requeuing it (restart 3" in (
        time_limit.reason
    )


def test_no_requeue_when_slurm_does_it_the_user_cancelled_or_the_cap_is_reached():
    for state in ("COMPLETING", "PENDING", "REQUEUED"):
        decision = decide(99, JOB, {"JobState": state}, 5)
        assert not decision.requeue and "SLURM is already requeuing job 7" in decision.reason
    cancelled = decide(99, JOB, {"JobState": "CANCELLED"}, 5)
    assert not cancelled.requeue and "cancelled" in cancelled.reason
    capped = decide(99, {**JOB, "SLURM_RESTART_COUNT": "5"}, {"JobState": "RUNNING"}, 5)
    assert not capped.requeue and "already requeued 5 times (--max_requeues 5)" in capped.reason
    for code in (0, 1, 130):
        assert not decide(code, JOB, {"JobState": "RUNNING"}, 5).requeue


def test_array_tasks_are_requeued_by_their_array_reference():
    env = {"SLURM_JOB_ID": "120", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "20"}
    assert job_reference(env) == "100_20"
    assert "job 100_20" in decide(99, env, {"JobState": "RUNNING"}, 5).reason


def test_command_line_without_slurm_or_without_scontrol_says_how_to_resubmit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    command = [sys.executable, "-m", "telepathy.slurm", "requeue", "--exit_code", "99"]
    outside = subprocess.run(command, env=env, capture_output=True, text=True)
    assert outside.returncode == 0 and "not running under SLURM: run the same command again" in outside.stdout
    (tmp_path / "bin").mkdir()  # a PATH with python but no scontrol, as in a container
    os.symlink(sys.executable, tmp_path / "bin" / "python")
    container = {**env, "SLURM_JOB_ID": "7", "PATH": str(tmp_path / "bin")}
    done = subprocess.run(command, env=container, capture_output=True, text=True)
    assert done.returncode == 0 and "scontrol not found: job 7 was NOT requeued; resubmit" in done.stdout
