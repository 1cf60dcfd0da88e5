"""Requeue a SLURM job after it exited 99 (saved, ready to requeue), from the batch script.

SLURM requeues a job by itself only when it kills it: at the end of a preemption's ``GraceTime``, or on
``scontrol requeue``. A job that saves and exits early is *not* requeued (SLURM 22.05 marks it FAILED with exit
code 99, even during a preemption), and a ``--signal`` time-limit warning never requeues. So after exit 99 the
batch script runs ``python -m telepathy.slurm requeue --exit_code 99`` and this module decides:

- job still RUNNING (time-limit warning, a preemption's grace period, a manual ``scancel --signal=TERM``):
  ``scontrol requeue`` — array-aware, once, and only below ``--max_requeues`` (counted from
  ``SLURM_RESTART_COUNT``) so a job that never makes progress cannot loop forever;
- job COMPLETING or PENDING: SLURM is already requeuing it (``scontrol requeue``, grace expired) — do nothing;
- job CANCELLED: a person cancelled it — do nothing;
- no ``scontrol`` (containers): say that the job was not requeued and how to resubmit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from telepathy.errors import EXIT_REQUEUE, EXIT_STOPPED_UNSAVED

FIELD = re.compile(r"(?:^|\s)(JobState|Restarts|PreemptTime|Requeue)=(\S*)")
RESUBMIT_HINT = "resubmit the same sbatch command with the same SAVE_DIR; it resumes from SAVE_DIR/latest"


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str


def job_reference(env: Mapping[str, str]) -> str | None:
    """``ARRAYJOB_TASK`` for an array task (what ``scontrol requeue`` expects), else the job id."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def parse_job_fields(scontrol_output: str) -> dict[str, str]:
    """The fields this module needs from ``scontrol show job -o``."""
    return dict(FIELD.findall(scontrol_output))


def decide(exit_code: int, env: Mapping[str, str], fields: Mapping[str, str] | None, max_requeues: int) -> Decision:
    """Pure policy: whether to requeue, and the sentence that says why. ``fields`` None: no scontrol."""
    if exit_code not in (EXIT_REQUEUE, EXIT_STOPPED_UNSAVED):
        return Decision(False, f"exit code {exit_code}: nothing to requeue")
    ref = job_reference(env)
    if ref is None:
        return Decision(False, "not running under SLURM: run the same command again; it resumes from SAVE_DIR/latest")
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= max_requeues:
        return Decision(False, f"job {ref} was already requeued {restarts} times (--max_requeues {max_requeues}); "
                               f"not requeuing again. If it is making progress, {RESUBMIT_HINT}")  # fmt: skip
    if fields is None:
        return Decision(False, f"scontrol not found: job {ref} was NOT requeued; {RESUBMIT_HINT}")
    state = fields.get("JobState", "UNKNOWN")
    if state == "CANCELLED":
        return Decision(False, f"job {ref} was cancelled: not requeuing it")
    if state != "RUNNING":
        return Decision(False, f"SLURM is already requeuing job {ref} (JobState={state}): not requeuing it twice")
    cause = "preempted" if fields.get("PreemptTime", "None") != "None" else "signalled (time limit or by hand)"
    saved = "saved" if exit_code == EXIT_REQUEUE else "nothing new was saved (it resumes from an older checkpoint)"
    return Decision(True, f"job {ref} was {cause} and {saved}; requeuing it (restart {restarts + 1}, "
                          f"at most {max_requeues})")  # fmt: skip


def requeue_after_exit(exit_code: int, max_requeues: int, env: Mapping[str, str] | None = None) -> int:
    """Decide, print the decision, and requeue when due. Returns 0, or 1 when ``scontrol requeue`` failed."""
    env = os.environ if env is None else env
    ref = job_reference(env)
    fields = None
    if shutil.which("scontrol") and ref is not None and exit_code in (EXIT_REQUEUE, EXIT_STOPPED_UNSAVED):
        fields = {"JobState": "RUNNING"}  # unknown after retries (slurmctld busy): try the requeue anyway
        for attempt in range(3):
            shown = subprocess.run(["scontrol", "show", "job", "-o", ref], capture_output=True, text=True)
            if shown.returncode == 0:
                fields = parse_job_fields(shown.stdout)
                break
            time.sleep(2 * (attempt + 1))
    elif shutil.which("scontrol"):
        fields = {}
    decision = decide(exit_code, env, fields, max_requeues)
    print(f"[telepathy] {decision.reason}", flush=True)
    if not decision.requeue:
        return 0
    done = subprocess.run(["scontrol", "requeue", ref], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"[telepathy] scontrol requeue {ref} failed: {done.stderr.strip()}; {RESUBMIT_HINT}", flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telepathy.slurm", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    requeue = verbs.add_parser("requeue", help="requeue this job if it exited 99 and SLURM will not")
    requeue.add_argument("--exit_code", "--exit-code", type=int, required=True)
    requeue.add_argument("--max_requeues", "--max-requeues", type=int, default=50)
    args = parser.parse_args(argv)
    if args.max_requeues < 0:
        parser.error("--max_requeues must be >= 0")
    return requeue_after_exit(args.exit_code, args.max_requeues)


if __name__ == "__main__":
    sys.exit(main())
