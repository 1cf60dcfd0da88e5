"""A bounded sample of the fault-injection campaigns (tests/helpers/fault_harness.py; the full versions are its
defaults): SIGKILL at random instants during saves, and damaged checkpoint files. Each has a negative control
that switches the protection off and must be caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HARNESS = Path(__file__).resolve().parents[1] / "helpers" / "fault_harness.py"


def campaign(tmp_path, *args: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, str(HARNESS), *args, "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def test_sigkill_at_random_instants_never_tears_the_resume_point(tmp_path):
    code, summary = campaign(tmp_path, "kills", "--count", "50", "--seed", "1")
    assert (summary["torn selected"], summary["resume failures"], summary["final mismatches"]) == (0, 0, 0), summary
    assert code == 0 and summary["kills"] >= 50 and summary["failures"] == []
    save_phases = [p for p in summary["kills by phase"] if p not in ("fork", "resume", "training step")]
    assert len(save_phases) >= 3, summary["kills by phase"]  # the kills really landed inside saves


def test_sigkill_with_differential_blobs_and_their_garbage_collection(tmp_path):
    code, summary = campaign(tmp_path, "kills", "--count", "30", "--seed", "3", "--store_mode", "differential")
    assert (summary["torn selected"], summary["resume failures"], summary["final mismatches"]) == (0, 0, 0), summary
    assert code == 0 and summary["failures"] == []


def test_damaged_files_are_detected_skipped_and_replayed_exactly(tmp_path):
    code, summary = campaign(tmp_path, "corrupt", "--rounds", "1", "--sample", "25", "--seed", "1")
    assert code == 0 and summary["failures"] == [], summary
    assert summary["detected"] == summary["damaged"] > 0 and summary["strict refusals"] == summary["strict cases"]
    assert summary["resume failures"] == summary["final mismatches"] == 0


def test_negative_controls_are_caught(tmp_path):
    code, kills = campaign(tmp_path / "kills", "kills", "--count", "30", "--negative_control")
    assert code == 1 and kills["torn selected"] > 0, kills
    code, damaged = campaign(tmp_path / "corrupt", "corrupt", "--rounds", "1", "--sample", "25", "--seed", "2",
                             "--negative_control")  # fmt: skip
    assert code == 1 and damaged["resume failures"] + damaged["final mismatches"] > 0, damaged
