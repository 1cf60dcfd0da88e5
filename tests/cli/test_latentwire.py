"""The LatentWire workload and its trainer: flags, exact resume through real signals, LLM identity."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios

import pytest
import torch
from harness import Interrupt, RunResult, run_once

from telepathy.disk.events import read_events
from telepathy.latentwire import config
from telepathy.store.checkpoint_store import CheckpointStore

TRAINER = [sys.executable, "-m", "telepathy.latentwire.train"]


def args_for(save_dir, *extra):
    return ["--save_dir", str(save_dir), "--samples", "32", "--batch_size", "8", "--epochs", "2", "--log_every",
            "1", "--checkpoint_interval", "1000", "--step_delay", "0.05", "--auto_resume", *extra]  # fmt: skip


def test_flags_accept_both_spellings_and_reject_unknown(capsys):
    args = config.parse(["--checkpoint-interval", "30", "--grace_period=5", "--llama-id", "x", "--auto-resume"])
    assert (args.checkpoint_interval, args.grace_period, args.llama_id, args.auto_resume) == (30.0, 5.0, "x", True)
    with pytest.raises(SystemExit) as err:
        config.parse(["--checkpoint_intervall", "30"])
    assert err.value.code == 2 and "did you mean --checkpoint_interval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.parse(["--grace_period", "0"])


@pytest.mark.slow
def test_trainer_resumes_bit_identically_and_refuses_another_llm(tmp_path):
    parts = ("encoder", "adapter_llama", "optimizer")
    reference = RunResult()
    assert run_once(args_for(tmp_path / "ref"), [], reference, trainer=TRAINER) == 0
    interrupted = RunResult()
    first = run_once(args_for(tmp_path / "run"), [Interrupt(3, signal.SIGTERM)], interrupted, trainer=TRAINER)
    assert first == 99
    assert run_once(args_for(tmp_path / "run"), [], interrupted, trainer=TRAINER) == 0
    final = {d: CheckpointStore(tmp_path / d).newest_valid()[0].path for d in ("ref", "run")}
    for part in parts:
        a = torch.load(final["ref"] / f"{part}.pt", weights_only=True)
        b = torch.load(final["run"] / f"{part}.pt", weights_only=True)
        assert str(a) == str(b) and all(
            torch.equal(x, y) for x, y in zip(a.values(), b.values()) if isinstance(x, torch.Tensor)
        ), part
    kinds = [e["event"] for e in read_events(tmp_path / "run") if e["event"] != "progress"]
    assert kinds[:3] == ["start", "save", "preempt"] and "resume" in kinds and kinds[-1] == "save"
    # A finished run resumed: exits 0 at once, no extra epochs.
    again = RunResult()
    assert run_once(args_for(tmp_path / "run"), [], again, trainer=TRAINER) == 0
    assert "already complete" in again.outputs[-1]
    # Resuming against a different frozen LLM (a different d_z changes the signature the same way) is refused.
    other = RunResult()
    assert run_once(args_for(tmp_path / "run", "--d_z", "16"), [], other, trainer=TRAINER) == 3  # not restarted
    assert "d_z: checkpoint has 32, this run has 16" in other.outputs[-1]


@pytest.mark.slow
def test_progress_bar_on_a_terminal_and_plain_lines_in_a_log(tmp_path):
    command = [*TRAINER, "--samples", "16", "--epochs", "1", "--log_every", "1"]
    primary, secondary = pty.openpty()  # a real terminal for the child's stdout, 24 x 100 characters
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([*command, "--save_dir", str(tmp_path / "tty")], stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    on_terminal = b"".join(chunks).decode(errors="replace")
    assert re.search(r"100%\|.*\| 2/2 .*samples_s=", on_terminal) and not re.search(r"^step \d", on_terminal, re.M)
    in_a_log = subprocess.run([*command, "--save_dir", str(tmp_path / "log")], capture_output=True, text=True)
    assert in_a_log.returncode == 0 and "%|" not in in_a_log.stdout + in_a_log.stderr
    assert re.search(r"^step 2/2 epoch 1 loss \S+ \(\d+\.\d{4}\) [\d.]+ samples/s eta 0s$", in_a_log.stdout, re.M)
    assert "epoch 1/1 done: mean loss" in in_a_log.stdout


@pytest.mark.slow
def test_the_default_workload_learns(tmp_path):
    """The demo must show training working: the second epoch's mean loss is clearly below the first's (200 steps
    of the default model and data; the README's default runs 1000)."""
    done = subprocess.run([*TRAINER, "--save_dir", str(tmp_path), "--samples", "800"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    means = [float(m) for m in re.findall(r"^epoch \d/2 done: mean loss (\S+)", done.stdout, re.M)]
    assert len(means) == 2 and means[1] < means[0] - 0.1, means  # 5.18 -> 4.98 here
