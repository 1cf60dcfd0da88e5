"""A real single-node SLURM for tests (scripts/slurm-local.sh): the cluster fixture, submitting the submit script,
reading a job's fields and log, waiting for states."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from telepathy.slurm import parse_job_fields

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "telepathy" / "submit_preemptible.slurm"
NUMERICS = ["--samples", "96", "--epochs", "2", "--log_every", "1", "--checkpoint_interval", "1000"]  # 24 steps


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, started if this machine can (root); otherwise the tests skip and say why (CI sets
    TELEPATHY_REQUIRE_SLURM=1: there a missing cluster is a failure, not a skip)."""
    running = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not running:
        if os.geteuid() != 0 and not os.environ.get("TELEPATHY_REQUIRE_SLURM"):
            pytest.skip("no running SLURM and not root: start one with `sudo scripts/slurm-local.sh start`")
        subprocess.run([str(REPO / "scripts" / "slurm-local.sh"), "start"], check=True, timeout=600)
    for job in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
        subprocess.run(["scancel", job])  # leftovers of an earlier run must not hold the node
    wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(), 60, "idle")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    fields = parse_job_fields(shown)
    fields.update(p.split("=", 1) for p in shown.split() if p.startswith(("ExitCode=", "Reason=", "StdOut=")))
    return fields


def submit(run_dir: Path, step_delay: float, *sbatch_args: str) -> str:
    env = {**os.environ, "SAVE_DIR": str(run_dir / "save"), "PYTHON": sys.executable,
           "TRAIN_ARGS": " ".join([*NUMERICS, "--step_delay", str(step_delay)])}  # fmt: skip
    done = subprocess.run(["sbatch", "--parsable", "-p", "low", "-c", "2", *sbatch_args, str(SUBMIT)], cwd=run_dir,
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip().split(";")[0]


def log_of(job_id: str) -> str:
    path = Path(job(job_id)["StdOut"])
    return path.read_text(errors="replace") if path.exists() else ""


def explain(job_id: str) -> str:
    """Everything known about a job, for an assertion message: its fields, the end of its log and what slurmctld
    and slurmd logged about it (a failure in CI can then be understood without rerunning it)."""
    lines = [str(job(job_id)), "--- job log (end):", log_of(job_id)[-4000:]]
    for daemon in ("slurmctld", "slurmd"):
        path = Path(f"/var/lib/telepathy-slurm/log/{daemon}.log")
        if path.exists():
            about = [line for line in path.read_text(errors="replace").splitlines() if f"{job_id}" in line]
            lines += [f"--- {daemon}.log lines about {job_id}:", *about[-40:]]
    return "\n".join(lines)


def wait_for_step(job_id: str, step: int, timeout: float = 120) -> None:
    wait_for(lambda: f"\nstep {step}/" in log_of(job_id), timeout, f"job {job_id} to log step {step}")


def release_when_requeued(job_id: str, *updates: str) -> None:
    """A requeued job waits ~120 s (BeginTime); let it start now — but not within the second of its requeue: slurmd
    revokes the ending incarnation's credential with a one-second timestamp, and an incarnation launched in that
    same second is refused ("Killing non-startable batch JobId=N: Job credential revoked", the job ends FAILED
    with exit 1). SLURM's own 120 s delay exists for this; a release 2 s after the requeue is still quick."""
    wait_for(lambda: job(job_id).get("JobState") == "PENDING", 120, f"job {job_id} to be requeued")
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now", *updates], check=True)


def wait_until_finished(job_id: str, timeout: float = 240) -> dict[str, str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_for(lambda: (f := job(job_id)).get("JobState") in ended and f, timeout, f"job {job_id} to end")
