"""``python -m telepathy status|list|prune|plot|export`` on real runs of the spec's test tool, preempted
twice by real SIGTERMs, and the one-line errors for paths that are not save dirs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from harness import telepathy_in_process
from safetensors.torch import load_file

from telepathy.disk.events import read_events
from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = pytest.mark.slow  # subprocesses
# 48 steps of the spec's test tool, slow enough to be signalled and inspected mid-run
RUN = [sys.executable, "-m", "telepathy.test_preemption",
       *"--epochs 3 --samples 256 --batch_size 16 --interval 1000 --step_delay 0.15".split()]  # fmt: skip
ENV = {**os.environ, "TELEPATHY_PROGRESS_EVERY": "0.1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command in this process; ``test_the_module_and_console_entry_points_run`` covers the real entry points."""
    return telepathy_in_process(*args)


def progress_step(save_dir) -> int:
    steps = [e["step"] for e in read_events(save_dir) if e["event"] == "progress"]
    return steps[-1] if steps else 0


def run_until(save_dir, stop_at: int | None) -> tuple[int, dict | None]:
    """One invocation; with ``stop_at`` it is SIGTERMed once past that step, after a `status` taken while it runs."""
    proc = subprocess.Popen([*RUN, "--save_dir", str(save_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    running = None
    if stop_at is not None:
        deadline = time.monotonic() + 60
        while progress_step(save_dir) < stop_at:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        running = json.loads(cli("status", str(save_dir), "--json").stdout)
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return proc.returncode, running


def test_status_list_plot_and_export_of_a_run_preempted_twice(tmp_path):
    save = tmp_path / "run"
    code, running = run_until(save, 10)
    assert code == 99 and running["state"].startswith("running (") and str(os.getpid()) not in running["state"]
    first = json.loads(cli("status", str(save), "--json").stdout)
    assert first["state"] == "preempted" and first["preemptions"] == 1 and first["last_exit_code"] == 99
    assert first["latest_checkpoint"]["reason"] == "signal:SIGTERM" and first["step"] >= 10
    assert run_until(save, 30)[0] == 99  # the last progress record is the first run's: stop well past it
    assert run_until(save, None)[0] == 0

    status = json.loads(cli("status", str(save), "--json").stdout)
    assert status["state"] == "complete" and status["last_exit_code"] == 0
    assert (status["preemptions"], status["restarts"], status["step"]) == (2, 2, 48)
    assert status["latest_checkpoint"]["reason"] == "final" and status["latest_checkpoint"]["bytes"] > 0
    assert status["time_lost_s"] > 0
    text = cli("status", str(save)).stdout
    assert "state        complete" in text and "preemptions  2, restarts 2" in text
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)  # several runs at once: one line each
    table = cli("status", str(save), str(tmp_path / "fresh")).stdout.splitlines()
    assert table[0].split()[:3] == ["state", "step", "epoch"] and len(table) == 3
    assert table[1].split()[:7] == ["complete", "48", "3", table[1].split()[3], "2", "2", "0"]
    assert table[2].startswith("not started")
    both = json.loads(cli("status", str(save), str(tmp_path / "fresh"), "--json").stdout)
    assert [entry["state"] for entry in both] == ["complete", "not started"]

    rows = json.loads(cli("list", str(save), "--json").stdout)
    assert [r["reason"] for r in rows] == ["signal:SIGTERM", "signal:SIGTERM", "final"]
    assert all(r["verified"] for r in rows) and rows[-1]["step"] == 48
    table = cli("list", str(save)).stdout
    assert table.splitlines()[0].split()[:2] == ["step", "epoch"] and table.count(" yes ") == 3

    done = cli("plot", str(save))
    assert done.returncode == 0, done.stderr
    import matplotlib.image

    image = matplotlib.image.imread(save / "run.png")
    assert image.shape[0] > 500 and image.shape[1] > 800  # a real PNG of the expected size

    done = cli("export", str(save), "--out", str(tmp_path / "export"))
    assert done.returncode == 0, done.stderr
    exported = load_file(tmp_path / "export" / "model.safetensors")
    saved = torch.load(CheckpointStore(save).newest_valid()[0].path / "model.pt", weights_only=True)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    again = cli("export", str(save), "--out", str(tmp_path / "export"))
    assert again.returncode == 1 and "nothing was overwritten" in again.stderr


def test_prune_dry_run_then_prune_and_refusal_under_a_live_run(tmp_path):
    save = tmp_path / "run"
    proc = subprocess.run([*RUN, "--save_dir", str(save), "--interval", "0.5", "--keep_last", "10"], env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    before = [r.step for r in CheckpointStore(save).committed()]
    assert len(before) >= 4
    dry = cli("prune", str(save), "--keep_last", "2", "--no-keep_best", "--dry-run")
    assert dry.returncode == 0 and f"would remove {len(before) - 2} checkpoint(s)" in dry.stdout
    assert [r.step for r in CheckpointStore(save).committed()] == before  # nothing removed
    hold = (
        "import sys, time; from telepathy.disk.lock import SaveDirLock; lock = SaveDirLock(sys.argv[1]); "
        "lock.acquire(); print('held', flush=True); time.sleep(60)"
    )  # a reference: the lock lives with it
    holder = subprocess.Popen([sys.executable, "-c", hold, str(save)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = cli("prune", str(save), "--keep_last", "2")
        assert busy.returncode == 75 and "pid" in busy.stderr
        assert "running" in json.loads(cli("status", str(save), "--json").stdout)["state"]
    finally:
        holder.kill()
        holder.wait()
    done = cli("prune", str(save), "--keep_last", "2", "--no-keep_best")
    assert done.returncode == 0, done.stderr
    assert [r.step for r in CheckpointStore(save).committed()] == before[-2:]


@pytest.mark.parametrize("verb", ["status", "list", "prune", "plot", "export"])
def test_a_wrong_path_is_one_clear_line(tmp_path, verb):
    missing = cli(verb, str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"telepathy {verb}: {tmp_path / 'nope'} does not exist"
    (tmp_path / "notes.txt").write_text("mine")
    foreign = cli(verb, str(tmp_path))
    assert foreign.returncode == 2 and len(foreign.stderr.strip().splitlines()) == 1
    assert "is not a telepathy save dir" in foreign.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_the_module_and_console_entry_points_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    done = subprocess.run([sys.executable, "-m", "telepathy", "status", str(tmp_path), "--json"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "not started", done.stderr
    script = shutil.which("telepathy")  # installed by `pip install -e .` ([project.scripts])
    if script is not None:
        done = subprocess.run([script, "list", str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("    step"), done.stderr


def test_status_of_a_run_that_stopped_at_its_duration_says_paused(tmp_path):
    """From review 5: a --duration stop (exit 0, saved, rerun to continue) was reported as failed."""
    done = subprocess.run([sys.executable, "-m", "telepathy.test_preemption", "--save_dir", str(tmp_path), "--duration",
                           "1", "--samples", "2048", "--step_delay", "0.05"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "duration reached" in done.stdout, done.stdout + done.stderr
    status = json.loads(cli("status", str(tmp_path), "--json").stdout)
    assert status["state"].startswith("paused") and status["last_exit_code"] == 0, status
