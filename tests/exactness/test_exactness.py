"""The heart of the suite: an interrupted-and-resumed run equals an uninterrupted one, bit for bit.

Each schedule runs ``telepathy.test_preemption`` as a real process and delivers real SIGTERM, SIGUSR1,
SIGINT and SIGKILL (also during a save), restarting after each exit. Every step's loss (``float.hex``) must
equal the uninterrupted run's -- including steps replayed after a SIGKILL -- and the final parameters,
optimizer state and RNG states must be ``torch.equal``. A negative control shows the comparison fails when
resume is broken. Set EXACTNESS_SUMMARY=path to append per-schedule counts as JSON lines.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
from harness import (
    BROKEN_TRAINER,
    Interrupt,
    RunResult,
    deep_equal,
    final_checkpoint,
    load_checkpoint_files,
    run_schedule,
)

pytestmark = pytest.mark.slow  # real processes: ~2-4 min on 2 cores

TERM, USR1, INT, KILL = signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGKILL
STEPS = 36  # 3 epochs x 12 batches (harness.small_run_args)
STEP_DELAY = ("--step_delay", "0.02")
SAVE_PAUSE = {"TELEPATHY_TEST_SAVE_STEP_PAUSE": "0.03"}  # makes a save last ~0.3 s, so a kill lands inside

NAMED_SCHEDULES: dict[str, list[list[Interrupt]]] = {
    "term_before_first_step": [[Interrupt(0, TERM)]],
    "kill_before_first_step": [[Interrupt(0, KILL)]],
    "int_before_first_step": [[Interrupt(0, INT)]],
    "term_at_epoch_boundary": [[Interrupt(12, TERM)], [Interrupt(24, INT)]],
    "last_batch_of_epoch": [[Interrupt(11, TERM)], [Interrupt(23, KILL)]],
    "usr1_saves_then_kill_replays": [[Interrupt(5, USR1), Interrupt(20, KILL)]],
    "kill_during_save": [[Interrupt(8, USR1, then_kill_after=0.12)], [Interrupt(20, USR1, then_kill_after=0.2)]],
    "term_on_last_step": [[Interrupt(35, TERM)]],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, dict[str, object]]:
    save_dir = tmp_path_factory.mktemp("reference")
    result = run_schedule(save_dir, [], extra_args=STEP_DELAY)
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    return result, load_checkpoint_files(final_checkpoint(save_dir))


def compare(result: RunResult, save_dir: Path, reference: tuple[RunResult, dict[str, object]]) -> list[str]:
    ref_result, ref_files = reference
    mismatches = list(result.replay_mismatches)
    for step in range(1, STEPS + 1):
        if result.losses.get(step) != ref_result.losses[step]:
            mismatches.append(f"loss at step {step}: {result.losses.get(step)} vs {ref_result.losses[step]}")
    mismatches += deep_equal(load_checkpoint_files(final_checkpoint(save_dir)), ref_files)
    return mismatches


def report(name: str, schedule: list[list[Interrupt]], result: RunResult, mismatches: list[str]) -> None:
    path = os.environ.get("EXACTNESS_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"schedule": name, "invocations": len(result.exit_codes),
                                "interrupts_delivered": result.interrupts_delivered,
                                "exit_codes": result.exit_codes, "mismatches": len(mismatches)}) + "\n")  # fmt: skip


def check_schedule(name, schedule, tmp_path, reference, extra_args=(), env=None) -> RunResult:
    result = run_schedule(tmp_path / "run", schedule, extra_args=STEP_DELAY + tuple(extra_args), env=env)
    mismatches = compare(result, tmp_path / "run", reference)
    report(name, schedule, result, mismatches)
    assert result.interrupts_delivered >= 1
    assert not mismatches, f"{name}: resumed run differs from the uninterrupted one:\n" + "\n".join(mismatches[:20])
    return result


@pytest.mark.parametrize("name", sorted(NAMED_SCHEDULES))
def test_named_schedule_is_bit_identical(name: str, tmp_path: Path, reference) -> None:
    check_schedule(name, NAMED_SCHEDULES[name], tmp_path, reference, env=SAVE_PAUSE)


def random_schedule(seed: int) -> list[list[Interrupt]]:
    """1-3 invocations, each with 1-2 interrupts at random steps; kills sometimes aimed at a save."""
    rng = random.Random(seed)
    schedule = []
    for _ in range(rng.randint(1, 3)):
        invocation = []
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(["TERM", "USR1", "INT", "KILL", "KILL_IN_SAVE"])
            step = rng.randint(0, STEPS)
            if kind == "KILL_IN_SAVE":
                invocation.append(Interrupt(step, USR1, then_kill_after=rng.uniform(0.0, 0.3)))
            else:
                invocation.append(Interrupt(step, getattr(signal, f"SIG{kind}")))
        schedule.append(sorted(invocation, key=lambda i: i.at_step))
    return schedule


@pytest.mark.parametrize("seed", range(4))
def test_random_schedule_is_bit_identical(seed: int, tmp_path: Path, reference) -> None:
    # Periodic saves on a short timer too, so interval and signal saves interleave.
    check_schedule(f"random-{seed}", random_schedule(seed), tmp_path, reference, ("--interval", "0.25"), SAVE_PAUSE)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 7))  # random kills in bulk: tests/helpers/fault_harness.py
def test_many_random_schedules_are_bit_identical(seed: int, tmp_path: Path, reference) -> None:
    check_schedule(f"random-{seed}", random_schedule(seed), tmp_path, reference, ("--interval", "0.25"), SAVE_PAUSE)


def test_kill_sweep_across_the_save_sequence(tmp_path: Path, reference) -> None:
    """SIGKILL at 12 offsets spread over a ~0.3 s save (each durability step pauses 30 ms): every kill leaves
    ``latest`` on a valid checkpoint (checked after each exit) and the finished run is bit-identical."""
    offsets = [0.025 * i for i in range(12)]
    schedule = [[Interrupt(2 + 3 * i, USR1, then_kill_after=d)] for i, d in enumerate(offsets)]
    result = check_schedule("kill_sweep", schedule, tmp_path, reference, env=SAVE_PAUSE)
    torn_saves_cleaned = sum("removing stale" in out for out in result.outputs)
    assert torn_saves_cleaned >= 3, f"only {torn_saves_cleaned} kills landed inside a save; the sweep missed its aim"


def test_dataloader_workers_resume_bit_identical(tmp_path: Path, reference) -> None:
    """Two worker processes, signals to the trainer mid-epoch: same losses as the single-process reference
    (per-sample noise is seeded by (seed, epoch, index), not by worker)."""
    schedule = [[Interrupt(7, USR1), Interrupt(15, TERM)], [Interrupt(30, KILL)]]
    check_schedule("workers", schedule, tmp_path, reference, ("--num_workers", "2"))


def test_negative_control_broken_resume_is_detected(tmp_path: Path, reference) -> None:
    """Same schedule, trainer with RNG restoration disabled: the comparison must find mismatches."""
    save_dir = tmp_path / "broken"
    result = run_schedule(save_dir, [[Interrupt(10, TERM)]], extra_args=STEP_DELAY, trainer=BROKEN_TRAINER)
    mismatches = compare(result, save_dir, reference)
    assert result.interrupts_delivered == 1
    assert any(m.startswith("loss at step") for m in mismatches), "broken resume went unnoticed"
    first_bad = min(int(m.split()[3].rstrip(":")) for m in mismatches if m.startswith("loss at step"))
    assert first_bad > 10, "steps before the interruption must still match"


@pytest.mark.parametrize("name", ["kill_during_save", "usr1_saves_then_kill_replays", "term_at_epoch_boundary"])
def test_async_saves_are_bit_identical(name: str, tmp_path: Path, reference) -> None:
    """Background commits (``--async_save``), SIGKILL while the writer thread is mid-save included."""
    check_schedule(f"async-{name}", NAMED_SCHEDULES[name], tmp_path, reference, ("--async_save",), SAVE_PAUSE)


def test_async_random_schedule_with_interval_saves_is_bit_identical(tmp_path: Path, reference) -> None:
    extra = ("--async_save", "--interval", "0.25")
    check_schedule("async-random-1", random_schedule(1), tmp_path, reference, extra, SAVE_PAUSE)


@pytest.mark.parametrize("mode", ["--differential", "--compress"])
def test_differential_and_compressed_saves_are_bit_identical(mode: str, tmp_path: Path, reference) -> None:
    """Every tensor as a blob (test hook), SIGKILL during saves, blobs shared across checkpoints and pruned."""
    env = {**SAVE_PAUSE, "TELEPATHY_TEST_MIN_BLOB_BYTES": "1"}
    schedule = NAMED_SCHEDULES["kill_during_save"] + [[Interrupt(30, TERM)]]
    extra = (mode, "--keep_last", "2")
    result = check_schedule(f"{mode[2:]}-kill_during_save", schedule, tmp_path, reference, extra, env)
    assert (tmp_path / "run" / "blobs").is_dir() and result.exit_codes[-1] == 0
