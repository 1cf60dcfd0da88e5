"""The main job's supervising wrapper, through the real CLI: forwarding, grace enforcement, restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from harness import Interrupt, RunResult, deep_equal, run_once

from telepathy.disk.events import read_events
from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = pytest.mark.slow  # real processes
MAIN = [sys.executable, "-m", "telepathy.preemptible_training"]


def main_args(save_dir, *extra):
    """12 steps (48 samples, batch 8, 2 epochs), every step logged."""
    return ["--save-dir", str(save_dir), "--samples", "48", "--epochs", "2", "--log_every", "1", "--step_delay",
            "0.05", "--checkpoint-interval", "1000", "--grace_period", "60", "--auto_resume", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run through the CLI: its final checkpoint and its per-step losses."""
    save_dir = tmp_path_factory.mktemp("reference")
    result = RunResult()
    assert run_once(main_args(save_dir), [], result, trainer=MAIN) == 0
    assert "trained model parts (encoder.pt, adapter_*.pt) are in" in result.outputs[-1]
    return CheckpointStore(save_dir).newest_valid()[0].path, result.losses


def assert_matches_reference(save_dir, result, reference):
    final, losses = CheckpointStore(save_dir).newest_valid()[0].path, reference[1]
    assert result.replay_mismatches == [] and result.losses == losses  # every step, to the last bit
    for part in ("encoder", "adapter_llama", "optimizer"):
        a, b = (torch.load(d / f"{part}.pt", weights_only=True) for d in (reference[0], final))
        assert deep_equal(a, b) == [], part


def test_sigterm_through_the_cli_then_auto_resume_equals_uninterrupted(tmp_path, reference):
    result = RunResult()
    assert run_once(main_args(tmp_path), [Interrupt(4, signal.SIGTERM)], result, trainer=MAIN) == 99
    assert run_once(main_args(tmp_path), [], result, trainer=MAIN) == 0
    assert_matches_reference(tmp_path, result, reference)
    kinds = [e["event"] for e in read_events(tmp_path)]
    assert "signal" in kinds and "preempt" in kinds and kinds.count("exit") == 2


def test_sigusr1_saves_and_continues_then_sigkill_then_auto_resume_equals_uninterrupted(tmp_path, reference):
    result = RunResult()
    interrupts = [Interrupt(3, signal.SIGUSR1), Interrupt(8, signal.SIGKILL)]  # SIGKILL: the supervisor itself
    assert run_once(main_args(tmp_path), interrupts, result, trainer=MAIN) == -signal.SIGKILL
    events = read_events(tmp_path)
    saves = [e for e in events if e["event"] == "save"]
    assert [e["reason"] for e in saves] == ["signal:SIGUSR1"] and 3 <= saves[0]["step"] < 8  # saved, kept training
    trainer_pid = next(e["pid"] for e in events if e["source"] == "trainer")
    assert wait_until_gone(trainer_pid), "the trainer outlived its SIGKILLed supervisor"
    assert run_once(main_args(tmp_path), [], result, trainer=MAIN) == 0
    assert_matches_reference(tmp_path, result, reference)
    resumed = next(e for e in read_events(tmp_path) if e["event"] == "resume")
    assert resumed["step"] == saves[0]["step"]


def test_crash_writes_an_emergency_checkpoint_restarts_and_still_equals_uninterrupted(tmp_path, reference):
    marker = tmp_path.parent / f"{tmp_path.name}-crashed"
    result = RunResult()
    code = run_once(main_args(tmp_path, "--max_restarts", "1"), [Interrupt(3, signal.SIGUSR1)], result,
                    trainer=MAIN, env={"TELEPATHY_TEST_CRASH_ONCE": f"{marker}:6"})  # fmt: skip
    assert code == 0 and marker.exists()
    assert "injected crash at step 6" in result.outputs[-1] and "restart 1/1" in result.outputs[-1]
    emergency = [p for p in (tmp_path / "emergency").iterdir()]
    assert len(emergency) == 1 and emergency[0].name.startswith("step_00000006_")
    assert torch.load(emergency[0] / "state.pt", weights_only=True)["global_step"] == 6
    assert_matches_reference(tmp_path, result, reference)
    kinds = [e["event"] for e in read_events(tmp_path)]
    assert kinds.count("restart") == 1 and kinds.count("resume") == 1 and kinds[-1] == "exit"


def wait_until_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` has exited (a zombie counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


HANGS_ON_TERM = textwrap.dedent("""
    import signal, time
    signal.signal(signal.SIGTERM, lambda *a: time.sleep(3600))  # "saving" forever
    print("ready", flush=True)
    time.sleep(3600)
""")


def test_trainer_that_overruns_the_grace_period_is_killed_and_exit_is_98_nothing_new_saved(tmp_path):
    """Issue 14: 99 promises a checkpoint committed for this stop; a command killed at the grace period saved
    nothing, so it is 98 and the log says where the next run resumes."""
    store = CheckpointStore(tmp_path)
    store.prepare()
    committed = store.save(4, {"encoder": {"w": torch.ones(3)}, "state": {"step": 4}}, {"reason": "interval"})
    store.close()  # this test process is not the run's writer
    proc = subprocess.Popen([*MAIN, "--save_dir", str(tmp_path), "--grace_period", "1", "--", sys.executable, "-c",
                             HANGS_ON_TERM], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 98
    out = proc.stdout.read()
    assert "grace period; killing it" in out and "with nothing new saved (exit 98)" in out
    assert "resumes from the newest valid checkpoint (step_00000004 or older)" in out
    assert store.newest_valid()[0].path == committed and store.latest_pointer() == committed
    assert [e["event"] for e in read_events(tmp_path)][-2:] == ["grace_expired", "exit"]


FAILS_ONCE = textwrap.dedent("""
    import os, sys
    marker = sys.argv[1]
    if not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(7)
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
