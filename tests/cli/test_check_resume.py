"""``telepathy check-resume`` on the example nanoGPT-style loop: the correct port is bit-identical, the port that
leaves the prefetched batch out and the one that re-seeds after a resume are caught at the first step after it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nanogpt_loop.py"


def check(*extra: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "telepathy", "check-resume", "--sigterm_at", "8", "--sigkill_at",
                           "22", "--", sys.executable, str(EXAMPLE), "--save_dir", "{save_dir}", "--iters", "30",
                           *extra], capture_output=True, text=True, timeout=600)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_the_correct_port_is_bit_identical():
    code, out = check()
    assert code == 0 and out.strip().endswith("bit-identical"), out
    assert out.count("bit-identical over 30 steps") == 2


@pytest.mark.parametrize("bug", ["prefetch", "rng"])
def test_a_broken_port_is_caught_at_the_first_step_after_the_resume(bug):
    code, out = check("--bug", bug)
    assert code == 1 and "NOT bit-identical" in out, out
    resumed = [int(m) for m in re.findall(r"resumed after step (\d+)", out)]
    first = [int(m) for m in re.findall(r"first step that differs: (\d+)", out)]
    assert first and first[0] == resumed[0] + 1, out
    assert "likely cause: the first step after a resume differs" in out


def test_a_command_without_the_placeholder_is_refused():
    done = subprocess.run([sys.executable, "-m", "telepathy", "check-resume", "--", "true"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "{save_dir}" in done.stderr and "Traceback" not in done.stderr
