"""The main job's supervising wrapper, through the real CLI: forwarding, grace enforcement, restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from harness import Interrupt, RunResult, run_once

from telepathy.checkpoint_store import CheckpointStore
from telepathy.events import read_events

pytestmark = pytest.mark.slow  # real processes
MAIN = [sys.executable, "-m", "telepathy.preemptible_training"]


def test_sigterm_through_the_cli_then_auto_resume_equals_uninterrupted(tmp_path):
    def args(d):
        return ["--save-dir", str(d), "--samples", "32", "--epochs", "2", "--log_every", "1", "--step_delay",
                "0.05", "--checkpoint-interval", "1000", "--grace_period", "60", "--auto_resume"]  # fmt: skip

    assert run_once(args(tmp_path / "ref"), [], RunResult(), trainer=MAIN) == 0
    result = RunResult()
    assert run_once(args(tmp_path / "run"), [Interrupt(2, signal.SIGTERM)], result, trainer=MAIN) == 99
    assert run_once(args(tmp_path / "run"), [], result, trainer=MAIN) == 0
    assert "trained model parts (encoder.pt, adapter_*.pt) are in" in result.outputs[-1]
    final = {d: CheckpointStore(tmp_path / d).newest_valid()[0].path for d in ("ref", "run")}
    for part in ("encoder", "adapter_llama"):
        a, b = (torch.load(final[d] / f"{part}.pt", weights_only=True) for d in ("ref", "run"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    kinds = [e["event"] for e in read_events(tmp_path / "run")]
    assert "signal" in kinds and "preempt" in kinds and kinds.count("exit") == 2


HANGS_ON_TERM = textwrap.dedent("""
    import signal, time
    signal.signal(signal.SIGTERM, lambda *a: time.sleep(3600))  # "saving" forever
    print("ready", flush=True)
    time.sleep(3600)
""")


def test_trainer_that_overruns_the_grace_period_is_killed_and_exit_is_99(tmp_path):
    store = CheckpointStore(tmp_path)
    store.prepare()
    committed = store.save(4, {"encoder": {"w": torch.ones(3)}, "state": {"step": 4}}, {"reason": "interval"})
    proc = subprocess.Popen([*MAIN, "--save_dir", str(tmp_path), "--grace_period", "1", "--", sys.executable, "-c",
                             HANGS_ON_TERM], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 99
    assert "grace period; killing it" in proc.stdout.read()
    assert store.newest_valid()[0].path == committed and store.latest_pointer() == committed
    assert [e["event"] for e in read_events(tmp_path)][-2:] == ["grace_expired", "exit"]


FAILS_ONCE = textwrap.dedent("""
    import os, sys
    marker = sys.argv[1]
    if not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(3)
""")


def test_crash_is_restarted_then_completes(tmp_path):
    marker = tmp_path / "crashed-once"
    done = subprocess.run([*MAIN, "--save_dir", str(tmp_path), "--max_restarts", "1", "--", sys.executable, "-c",
                           FAILS_ONCE, str(marker)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "restart 1/1" in done.stdout
    assert [e["event"] for e in read_events(tmp_path)] == ["supervisor_start", "restart", "exit"]
    failing = subprocess.run([*MAIN, "--save_dir", str(tmp_path), "--max_restarts", "0", "--", sys.executable, "-c",
                              "raise SystemExit(5)"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert failing.returncode == 5 and "trainer failed (exit code 5)" in failing.stdout
