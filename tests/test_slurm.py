"""The submit script on a real single-node SLURM (scripts/slurm-local.sh): preemption, time-limit warning,
operator requeue and manual save, each finishing bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import RunResult, deep_equal

from telepathy.checkpoint_store import CheckpointStore
from telepathy.events import read_events
from telepathy.slurm import parse_job_fields

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
REPO = Path(__file__).resolve().parents[1]
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


def wait_for_step(job_id: str, step: int, timeout: float = 120) -> None:
    wait_for(lambda: f"\nstep {step}/" in log_of(job_id), timeout, f"job {job_id} to log step {step}")


def release_when_requeued(job_id: str, *updates: str) -> None:
    """A requeued job waits ~120 s (BeginTime); let it start now."""
    wait_for(lambda: job(job_id).get("JobState") == "PENDING", 120, f"job {job_id} to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now", *updates], check=True)


def wait_until_finished(job_id: str, timeout: float = 240) -> dict[str, str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_for(lambda: (f := job(job_id)).get("JobState") in ended and f, timeout, f"job {job_id} to end")


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
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", final
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
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", final
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
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", final
    assert restarts_logged(job_id) == [0, 1] and "requeuing it (restart" not in log_of(job_id)  # SLURM's requeue only
    exits = [e["exit_code"] for e in read_events(events) if e["event"] == "exit"]
    assert exits == [99, 0]  # the killed job's shell may not live to log it; the supervisor's event does
    assert_bit_identical(tmp_path, job_id, reference)
