"""The wrapper's flags reach a command after '--' (as defaults of its Checkpointer) or are refused with a message;
never ignored."""

from __future__ import annotations

import json
import subprocess
import sys

from telepathy import CheckpointOptions
from telepathy.options import DEFAULTS_ENV, SAVE_DIR_ENV

MAIN = [sys.executable, "-m", "telepathy.preemptible_training"]
SHOW = f"import json, os; print(os.environ.get({DEFAULTS_ENV!r})); print(os.environ.get({SAVE_DIR_ENV!r}))"


def test_checkpoint_flags_travel_to_the_command(tmp_path):
    done = subprocess.run([*MAIN, "--save_dir", str(tmp_path), "--keep_last", "5", "--save_every_steps", "2",
                           "--strict_resume", "--", sys.executable, "-c", SHOW], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    flags, save_dir = done.stdout.splitlines()[:2]
    assert json.loads(flags) == {"keep_last": 5, "save_every_steps": 2, "strict_resume": True}
    assert save_dir == str(tmp_path.resolve())


def test_workload_flags_are_refused_for_a_command(tmp_path):
    done = subprocess.run([*MAIN, "--save_dir", str(tmp_path), "--samples", "10", "--", sys.executable, "-c", "0"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "--samples configure the LatentWire job" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_checkpointer_takes_them_as_defaults_and_says_when_the_script_overrides(monkeypatch, caplog):
    monkeypatch.setenv(DEFAULTS_ENV, json.dumps({"keep_last": 5, "checkpoint_interval": 30.0, "compress": True}))
    assert CheckpointOptions.resolve(None, {}) == CheckpointOptions(keep_last=5, interval=30.0, format="compressed")
    assert CheckpointOptions.resolve(None, {"keep_last": 2}).keep_last == 2
    assert "the wrapper asked for keep_last=5 but this script sets keep_last=2" in caplog.text


def test_options_passed_whole_are_said_to_override_only_the_wrapper_flags_they_change(monkeypatch, caplog):
    """From review 5: under Lightning (which passes whole options) the warning listed every wrapper flag as
    overridden, snapshot_every_step included, although the ones that agreed were applied."""
    monkeypatch.setenv(DEFAULTS_ENV, json.dumps({"snapshot_every_step": True, "checkpoint_interval": 30.0}))
    options = CheckpointOptions(interval=60.0, snapshot_every_step=True)
    assert CheckpointOptions.resolve(options, {}) == options
    assert "'interval': 30.0" in caplog.text and "interval=60.0" in caplog.text
    assert "snapshot_every_step" not in caplog.text
    caplog.clear()
    CheckpointOptions.resolve(CheckpointOptions(interval=30.0, snapshot_every_step=True), {})
    assert "overridden" not in caplog.text
