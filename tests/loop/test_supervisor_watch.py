"""A trainer follows its supervisor: when the report pipe's read end closes (the wrapper was killed), it stops as on
SIGTERM; nothing else makes it stop (from a review: a closed or reused descriptor number, handlers reinstalled)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCENARIO = textwrap.dedent("""
    import os, signal, sys, time
    from telepathy import training_signals as ts
    r, w = os.pipe()
    os.environ[ts.REPORT_FD_ENV] = str(w)
    ts.install_signal_handlers()
    how = sys.argv[1]
    if how == "alive":
        pass
    elif how == "number closed":  # the program closes the descriptor number; the supervisor is still there
        os.close(w)
    elif how == "number reused":
        os.close(w)
        os.dup2(os.open(os.devnull, os.O_WRONLY), w)
    elif how == "supervisor gone":
        os.close(r)
    elif how == "gone while uninstalled":
        ts.uninstall_signal_handlers()
        os.close(r)
        time.sleep(0.5)
        ts.install_signal_handlers()
    deadline = time.monotonic() + 3
    while ts.exit_signal() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    print("stop" if ts.exit_signal() == signal.SIGTERM else "none", flush=True)
""")


CASES = [("alive", "none"), ("number closed", "none"), ("number reused", "none"), ("supervisor gone", "stop"),
         ("gone while uninstalled", "stop")]  # fmt: skip


@pytest.mark.parametrize(("how", "expected"), CASES)
def test_the_trainer_stops_when_and_only_when_its_supervisor_is_gone(how, expected):
    done = subprocess.run([sys.executable, "-c", SCENARIO, how], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected, done.stdout + done.stderr
    if expected == "stop":
        assert "the supervising wrapper is gone" in done.stderr
