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


def check(*extra: str, at: tuple[str, str] = ("8", "22"), shell: list[str] = ()) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "telepathy", "check-resume", "--sigterm_at", at[0], "--sigkill_at",
                           at[1], "--", *shell, sys.executable, str(EXAMPLE), "--save_dir", "{save_dir}", "--iters",
                           "30", *extra], capture_output=True, text=True, timeout=600)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


# Writes 200 KB to stderr, then runs the command: more than a pipe holds (review 5: the checker read stderr only
# after the command ended, so such a command blocked until the timeout).
CHATTY = ["sh", "-c", 'head -c 200000 /dev/zero | tr \'\\0\' x >&2; exec "$0" "$@"']


def test_the_correct_port_is_bit_identical_and_the_sigterm_lands_at_its_step():
    code, out = check(shell=CHATTY)
    assert code == 0 and out.strip().endswith("bit-identical"), out
    assert out.count("bit-identical over 30 steps") == 2
    assert "sigterm: bit-identical over 30 steps (resumed after step 8)" in out, out  # held there until signalled


@pytest.mark.parametrize("bug", ["prefetch", "rng"])
def test_a_broken_port_is_caught_at_the_first_step_after_the_resume(bug):
    code, out = check("--bug", bug)
    assert code == 1 and "NOT bit-identical" in out, out
    resumed = [int(m) for m in re.findall(r"resumed after step (\d+)", out)]
    first = [int(m) for m in re.findall(r"first step that differs: (\d+)", out)]
    assert first and first[0] == resumed[0] + 1, out
    assert "likely cause: the first step after a resume differs" in out


def test_signals_at_or_after_the_last_step_are_refused_not_passed():
    """From review 5: a trial the signal never interrupted counted as bit-identical, even for a broken port."""
    code, out = check("--bug", "rng", at=("30", "30"))
    assert code == 2 and "before the last one (30)" in out and "bit-identical" not in out, out


def test_a_sigkill_before_the_first_checkpoint_tests_nothing_and_says_so():
    """From review 6: a SIGKILL before the example's first save (it saves every 10 steps) restarted the run from
    scratch, and the trial passed as "bit-identical (resumed after step 0)", a broken port included."""
    code, out = check("--bug", "rng", at=("12", "5"))
    assert code == 2 and "never resumed from a checkpoint" in out, out


def test_a_command_that_cannot_start_is_named_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "telepathy", "check-resume", "--", str(tmp_path / "missing"),
                           "{save_dir}"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "cannot start" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_command_without_the_placeholder_is_refused():
    done = subprocess.run([sys.executable, "-m", "telepathy", "check-resume", "--", "true"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "{save_dir}" in done.stderr and "Traceback" not in done.stderr
