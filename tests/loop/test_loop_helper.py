"""``telepathy.loop.PreemptibleRun``: the ten-line loop is as exact as the full Checkpointer loop (SIGTERM →
exit 99 → rerun → the same losses and weights as an uninterrupted run), and it refuses a loop that forgets
``step_done``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = pytest.mark.slow  # subprocesses

SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    from telepathy.loop import PreemptibleRun

    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(128, 8), torch.randint(0, 2, (128,)))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with PreemptibleRun(sys.argv[1], dataset, batch_size=8, epochs=2, parts={"model": model},
                        optimizer=optimizer) as run:
        for x, y in run.batches():
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"step {run.state.global_step + 1} loss {loss.item().hex()}", flush=True)
            time.sleep(float(sys.argv[2]))
            run.step_done(loss.item())
""")


def run(save_dir, delay: float, sigterm_at: int | None = None) -> tuple[int, dict[int, str]]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(save_dir), str(delay)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    losses = {}
    for line in proc.stdout:
        step, loss = re.match(r"step (\d+) loss (\S+)", line).groups()
        losses[int(step)] = loss
        if sigterm_at is not None and int(step) >= sigterm_at:
            proc.send_signal(signal.SIGTERM)
            sigterm_at = None
    return proc.wait(timeout=60), losses


def final_model(save_dir):
    return torch.load(CheckpointStore(save_dir).newest_valid()[0].path / "model.pt", weights_only=True)


def test_sigterm_then_rerun_equals_an_uninterrupted_run(tmp_path):
    code, reference = run(tmp_path / "ref", 0.0)
    assert code == 0 and sorted(reference) == list(range(1, 33))
    code, first = run(tmp_path / "run", 0.1, sigterm_at=10)
    assert code == 99 and max(first) < 32
    code, second = run(tmp_path / "run", 0.0)
    assert code == 0 and min(second) == max(first) + 1
    assert {**first, **second} == reference
    a, b = final_model(tmp_path / "ref"), final_model(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run(tmp_path / "run", 0.0) == (0, {})  # a finished run stays finished


def test_a_loop_without_step_done_is_refused(tmp_path):
    script = SCRIPT.replace("        run.step_done(loss.item())\n", "")
    assert "step_done" not in script
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), "0"], capture_output=True, text=True)
    assert done.returncode == 1 and "call run.step_done() after each optimizer step" in done.stderr
