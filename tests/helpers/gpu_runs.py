"""Run ``gpu_worker.py`` as real processes under real signals and compare with an uninterrupted run, on any device:
the ``cuda`` tests call these with ``"cuda"``, the harness self-checks with ``"cpu"`` (so the same code is proven to
catch a difference on a machine without a GPU)."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
from harness import (
    Interrupt,
    RunResult,
    deep_equal,
    final_checkpoint,
    load_checkpoint_files,
    run_killing_the_trainer,
    run_schedule,
    small_run_args,
)

WORKER = [sys.executable, str(Path(__file__).with_name("gpu_worker.py"))]
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what the README tells GPU users to set
SAVE_PAUSE = {"TELEPATHY_TEST_SAVE_STEP_PAUSE": "0.03"}  # a save lasts ~0.3 s, so a kill lands inside it
STEPS = 36  # harness.small_run_args: 3 epochs x 12 batches
STEP_DELAY = ("--step_delay", "0.02")
TERM, USR1, KILL = signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def worker_args(device: str, *extra: str) -> tuple[str, ...]:
    return ("--device", device, *STEP_DELAY, *extra)


def reference(save_dir: Path, device: str, *extra: str) -> tuple[RunResult, dict[str, object]]:
    """An uninterrupted run: every step's loss and the final model, optimizer and state files."""
    result = run_schedule(save_dir, [], extra_args=worker_args(device, *extra), trainer=WORKER, env=DETERMINISTIC_ENV)
    assert sorted(result.losses) == list(range(1, STEPS + 1)), result.outputs[-1][-2000:]
    return result, load_checkpoint_files(final_checkpoint(save_dir))


def mismatches(save_dir: Path, schedule: list[list[Interrupt]], ref: tuple[RunResult, dict[str, object]],
               device: str, *extra: str, env: dict[str, str] | None = None) -> tuple[RunResult, list[str]]:  # fmt: skip
    """Run ``schedule`` to the end; what differs from ``ref`` (every step's loss token, replays included, and the
    final files: weights, optimizer, scheduler, GradScaler, every RNG state). Empty when bit-identical."""
    result = run_schedule(save_dir, schedule, extra_args=worker_args(device, *extra), trainer=WORKER,
                          env={**DETERMINISTIC_ENV, **(env or {})})  # fmt: skip
    assert result.interrupts_delivered >= 1, "no signal was delivered: the schedule proves nothing"
    found = list(result.replay_mismatches)
    found += [f"step {s}: {result.losses.get(s)} vs {ref[0].losses[s]}" for s in range(1, STEPS + 1)
              if result.losses.get(s) != ref[0].losses[s]]  # fmt: skip
    found += deep_equal(load_checkpoint_files(final_checkpoint(save_dir)), ref[1])
    return result, found


def scales(result: RunResult) -> list[tuple[str, str]]:
    """(scale, growth tracker) of every step, from the loss tokens of an ``--amp fp16`` run."""
    return [tuple(result.losses[s].split("/")[1:3]) for s in sorted(result.losses)]


def supervised(save_dir: Path, device: str, *extra: str) -> list[str]:
    """The worker under the supervising wrapper with per-step snapshots into shared memory."""
    worker = small_run_args(save_dir, "--snapshot_every_step", "--device", device, "--step_delay", "0.05", *extra)
    return [sys.executable, "-m", "telepathy.preemptible_training", "--save_dir", str(save_dir), "--grace_period",
            "60", "--max_restarts", "2", "--restart_backoff", "0.1", "--", *WORKER, *worker]  # fmt: skip


def kill_the_trainer(save_dir: Path, device: str, kill_after: list[int], seed: int) -> tuple[int, RunResult, list]:
    """Run the supervisor; SIGKILL only its trainer a random fraction of a step after it printed each step in
    ``kill_after``. Returns the exit code, the losses and, per kill, (last step printed, step resumed at)."""
    return run_killing_the_trainer(supervised(save_dir, device), kill_after, seed, env=DETERMINISTIC_ENV, jitter=0.05)


def check_per_step_protection(save_dir: Path, device: str, ref: tuple[RunResult, dict[str, object]]) -> None:
    """Three SIGKILLs of the trainer: each replays at most the step in flight, the run ends bit-identical."""
    code, result, kills = kill_the_trainer(save_dir, device, [5, 17, 29], seed=3)
    output = result.outputs[-1]
    assert code == 0, output[-3000:]
    assert len(kills) == 3 and all(resumed is not None for _, resumed in kills), (kills, output[-3000:])
    assert all(0 <= last - resumed <= 1 for last, resumed in kills), (kills, output[-3000:])
    assert "snapshot from shared memory" in output, output[-3000:]
    assert result.replay_mismatches == [] and result.losses == ref[0].losses
    assert deep_equal(load_checkpoint_files(final_checkpoint(save_dir)), ref[1]) == []


def one_rank_env() -> dict[str, str]:
    """The environment of rank 0 of a one-rank process group, on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
