"""The README's Python examples run as written, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs(index, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_loop_example_commits_a_final_checkpoint_and_resumes(tmp_path):
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[0]], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs/readme_example/latest/manifest.json").is_file()
    # 2 epochs x 8 batches; the rerun resumes a finished run instead of training `epochs` more (the seed's bug)
    steps = [p.name for p in (tmp_path / "runs/readme_example/checkpoints").iterdir()]
    assert steps == ["step_00000016"]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(pip install .*?)\n```", README)
    assert len(commands) == 2, "the README's first two commands: run the demo, run the tests"
    assert commands[1] in (REPO / ".ci/run").read_text()
