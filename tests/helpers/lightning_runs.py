"""Run tests/helpers/lightning_worker.py as a real process, deliver real signals at chosen steps, and compare runs:
every step's loss (``float.hex``, per rank) and the final checkpoint's Lightning dict, bit for bit."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness import deep_equal

WORKER = Path(__file__).resolve().parent / "lightning_worker.py"
STEP = re.compile(r"^step (\d+) rank (\d+) loss (\S+)$", re.MULTILINE)


@dataclass
class Run:
    code: int
    output: str
    losses: dict[tuple[int, int], str] = field(default_factory=dict)  # (step, rank) -> loss

    def steps(self, rank: int = 0) -> list[int]:
        return sorted(s for s, r in self.losses if r == rank)


def losses_in(text: str) -> dict[tuple[int, int], str]:
    return {(int(s), int(r)): h for s, r, h in STEP.findall(text)}


def run_worker(save_dir: Path, *args: str, signal_at_step: tuple[int, int] | None = None, timeout: float = 180) -> Run:
    """Run the worker until it exits. ``signal_at_step=(step, sig)`` sends ``sig`` to the worker's main process
    (rank 0) once it printed that step (from outside: it lands wherever the run is by then)."""
    proc = subprocess.Popen([sys.executable, str(WORKER), str(save_dir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = STEP.match(line.rstrip("\n"))
        if signal_at_step is not None and match and int(match.group(1)) >= signal_at_step[0]:
            proc.send_signal(signal_at_step[1])
            signal_at_step = None
    proc.wait(timeout=timeout)
    output = "".join(lines)
    return Run(proc.returncode, output, losses_in(output))


def reference_run(save_dir: Path, *args: str) -> tuple[dict[tuple[int, int], str], dict]:
    """An uninterrupted run: every step's loss and the final checkpoint's Lightning dict."""
    run = run_worker(save_dir, *args)
    assert run.code == 0, run.output[-3000:]
    return run.losses, final_checkpoint(save_dir)


def merged(*runs: Run) -> tuple[dict[tuple[int, int], str], list[str]]:
    """Every step's loss over consecutive runs, and the steps a later run replayed with a different loss."""
    losses: dict[tuple[int, int], str] = {}
    mismatches = []
    for run in runs:
        for key, loss in run.losses.items():
            if key in losses and losses[key] != loss:
                mismatches.append(f"step {key}: {losses[key]} then {loss}")
            losses.setdefault(key, loss)
    return losses, mismatches


def final_checkpoint(save_dir: Path) -> dict:
    """The Lightning dict of the run's newest checkpoint (its ``final`` one once the run completed)."""
    return torch.load(save_dir / "latest" / "lightning.pt", weights_only=True)


def assert_same_training(reference: tuple[dict, dict], save_dir: Path, *runs: Run) -> None:
    """The runs together trained exactly as the reference: every loss, the weights, optimizer and LR schedule."""
    ref_losses, ref_final = reference
    losses, mismatches = merged(*runs)
    assert mismatches == []
    assert losses == ref_losses, sorted(k for k in ref_losses if losses.get(k) != ref_losses[k])[:5]
    final = final_checkpoint(save_dir)
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert deep_equal(final[key], ref_final[key]) == [], key
    assert final["global_step"] == ref_final["global_step"]
