"""``transformers.Trainer`` under telepathy (tests/helpers/hf_worker.py: a tiny Llama built from a config, dropout on):
SIGTERM → save at the step boundary → exit 99 → resume → the same losses and final weights as an
uninterrupted run; a torn (unsealed) checkpoint is never resumed from."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from telepathy.hf_trainer import last_sealed_checkpoint

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parents[1] / "helpers" / "hf_worker.py"


def run(out: Path, delay: float, sigterm_at: int | None = None, *flags: str) -> tuple[int, dict[int, str]]:
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), str(delay), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = re.match(r"step (\d+) loss", line)
        if sigterm_at is not None and match and int(match.group(1)) >= sigterm_at:
            proc.send_signal(signal.SIGTERM)
            sigterm_at = None
    proc.wait(timeout=120)
    output = "".join(lines)
    losses = {int(s): h for s, h in re.findall(r"step (\d+) loss (0x\S+)", output)}
    return proc.returncode, losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-reference")
    code, losses = run(out, 0.0)
    assert code == 0 and sorted(losses) == list(range(1, 25))
    return torch.load(out / "final.pt", weights_only=True), losses


def test_sigterm_saves_exits_99_and_the_resume_is_bit_identical(tmp_path, reference):
    ref_weights, ref_losses = reference
    code, first = run(tmp_path, 0.3, sigterm_at=5)
    assert code == 99
    sealed = last_sealed_checkpoint(tmp_path)
    stopped = max(first)
    assert sealed is not None and sealed.name == f"checkpoint-{stopped}" and stopped < 10  # not a save_steps one
    code, second = run(tmp_path, 0.0)
    assert code == 0 and min(second) == stopped + 1
    assert {**first, **second} == ref_losses  # every step's loss, to the last bit
    weights = torch.load(tmp_path / "final.pt", weights_only=True)
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_a_torn_checkpoint_is_skipped_and_the_run_still_matches(tmp_path, reference):
    ref_weights, ref_losses = reference
    code, first = run(tmp_path, 0.3, sigterm_at=12)  # checkpoint-10 (save_steps) and the SIGTERM one
    assert code == 99
    newest = last_sealed_checkpoint(tmp_path)
    assert newest is not None and newest.name != "checkpoint-10"
    # What a kill in the middle of Trainer's save leaves: files half written, no manifest (the seal) yet.
    (newest / "manifest.json").unlink()
    with open(newest / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    assert last_sealed_checkpoint(tmp_path).name == "checkpoint-10"
    code, second = run(tmp_path, 0.0)
    assert code == 0 and min(second) == 11  # replayed from checkpoint-10
    assert {**first, **second} == ref_losses
    weights = torch.load(tmp_path / "final.pt", weights_only=True)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def checkpoint_names(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def test_a_sigterm_after_the_last_step_is_a_completed_run_and_an_early_end_without_a_save_is_98(tmp_path, reference):
    """From review 5: the exit code followed the signal alone, so a SIGTERM during the final logging returned 99
    with no checkpoint for it; and a run another callback ended early, with the signal after the last save, too."""
    code, losses = run(tmp_path / "late", 0.0, None, "--term_at", "24")
    assert code == 0 and losses == reference[1]
    code, losses = run(tmp_path / "early", 0.0, None, "--stop_at", "13")
    assert code == 98 and max(losses) == 13  # checkpoint-10 is the newest: nothing saved for this stop
    assert last_sealed_checkpoint(tmp_path / "early").name == "checkpoint-10"


def test_save_total_limit_never_leaves_a_kill_without_a_sealed_checkpoint(tmp_path, reference):
    """From review 5: Trainer prunes to save_total_limit before the new checkpoint is sealed, so a kill in between
    left nothing to resume from. telepathy prunes after sealing: a kill in the save of step 20 (checkpoint-20
    written, not sealed) resumes from checkpoint-10, and a finished run keeps one sealed checkpoint."""
    (tmp_path / "checkpoint-1").mkdir()  # the user's own, not sealed by telepathy: never removed (review 6)
    (tmp_path / "checkpoint-1" / "notes.txt").write_text("mine")
    code, first = run(tmp_path, 0.0, None, "--save_total_limit", "1", "--kill_in_save_at", "20")
    assert code == -signal.SIGKILL and max(first) == 20
    assert last_sealed_checkpoint(tmp_path).name == "checkpoint-10"
    code, second = run(tmp_path, 0.0, None, "--save_total_limit", "1")
    assert code == 0 and min(second) == 11
    assert {**first, **second} == reference[1]
    assert checkpoint_names(tmp_path) == ["checkpoint-1", "checkpoint-24"]
    assert last_sealed_checkpoint(tmp_path).name == "checkpoint-24"
    assert (tmp_path / "checkpoint-1" / "notes.txt").read_text() == "mine"
