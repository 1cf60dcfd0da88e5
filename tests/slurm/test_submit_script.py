"""The submit script outside SLURM (plain bash), and its opt-in git synchronisation against a local bare
repository: pull before the first start (refused on a dirty tree or a diverged branch, training runs anyway),
results pushed after completion, checkpoints kept out of git."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes
SUBMIT = Path(__file__).resolve().parents[2] / "telepathy" / "submit_preemptible.slurm"
IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.org"}  # fmt: skip


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **IDENTITY}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repos(tmp_path):
    """origin.git (bare), the experiment clone the job runs in, and a colleague's clone."""
    git(tmp_path, "init", "-q", "--bare", "-b", "main", "origin.git")
    git(tmp_path, "clone", "-q", "origin.git", "work")
    (tmp_path / "work" / "notes.md").write_text("experiment\n")
    git(tmp_path / "work", "add", "notes.md")
    git(tmp_path / "work", "commit", "-q", "-m", "start")
    git(tmp_path / "work", "push", "-q", "-u", "origin", "main")
    git(tmp_path, "clone", "-q", "origin.git", "colleague")
    return tmp_path / "origin.git", tmp_path / "work", tmp_path / "colleague"


def run_job(work: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(IDENTITY, GIT_SYNC="1", PYTHON=sys.executable, **extra)
    return subprocess.run(["bash", str(SUBMIT)], cwd=work, env=env, capture_output=True, text=True, timeout=300)


def colleague_pushes(colleague: Path, name: str) -> None:
    git(colleague, "pull", "-q", "--ff-only")
    (colleague / name).write_text("change\n")
    git(colleague, "add", name)
    git(colleague, "commit", "-q", "-m", f"add {name}")
    git(colleague, "push", "-q")


def test_pulls_then_trains_then_pushes_results_without_checkpoints(repos):
    origin, work, colleague = repos
    colleague_pushes(colleague, "new_code.py")
    done = run_job(work, TRAIN_ARGS="--samples 8 --epochs 1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "git sync: up to date with upstream at" in done.stdout and (work / "new_code.py").exists()
    assert (work / "runs/telepathy_local/latest/encoder.pt").exists()  # trained here ...
    pushed = git(origin, "ls-tree", "-r", "--name-only", "main").split()
    assert "results/telepathy_local/events.jsonl" in pushed
    assert not [p for p in pushed if p.endswith(".pt") or p.startswith("runs/")]  # ... but kept out of git
    assert git(origin, "log", "-1", "--format=%s", "main").strip() == "results: telepathy_local (job local)"


def test_dirty_tree_or_diverged_branch_is_not_pulled_and_training_still_runs(repos):
    origin, work, colleague = repos
    (work / "notes.md").write_text("edited, not committed\n")
    dirty = run_job(work, COMMAND="true")
    assert dirty.returncode == 0 and "has uncommitted changes; not pulling" in dirty.stdout
    assert "trainer exit code 0" in dirty.stdout
    git(work, "checkout", "-q", "notes.md")
    colleague_pushes(colleague, "theirs.py")
    (work / "mine.py").write_text("local\n")
    git(work, "add", "mine.py")
    git(work, "commit", "-q", "-m", "local commit")
    diverged = run_job(work, COMMAND="true", RUN_NAME="second")
    assert diverged.returncode == 0 and "'git pull --ff-only' refused" in diverged.stdout
    assert "trainer exit code 0" in diverged.stdout and not (work / "theirs.py").exists()
    assert "could not commit or push results/second" in diverged.stdout  # its commit stays local, said so
