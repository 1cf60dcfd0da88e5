"""Hard kills, no warning: the trainer SIGKILLed at random instants under the supervisor with per-step snapshots
(``--snapshot_every_step``) loses at most the step in flight and finishes bit-identically; a torn shared-memory
snapshot is never committed; a supervisor killed during its rescue commit leaves no torn checkpoint."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import (
    RESUMED,
    STEP_LINE,
    TRAINER,
    RunResult,
    deep_equal,
    final_checkpoint,
    load_checkpoint_files,
    run_killing_the_trainer,
    small_run_args,
)
from torch import nn

from telepathy import Checkpointer, TrainState
from telepathy.disk import slots
from telepathy.disk.catalog import Catalog
from telepathy.disk.save_dir import SaveDir
from telepathy.store import step_snapshots
from telepathy.store.step_snapshots import StepSnapshots


def supervised(save_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "telepathy.preemptible_training", "--save_dir", str(save_dir), "--grace_period",
            "60", "--max_restarts", "2", "--restart_backoff", "0.1", "--",
            *TRAINER, *small_run_args(save_dir, "--snapshot_every_step", *extra)]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("reference")
    done = subprocess.run([*TRAINER, *small_run_args(save_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = RunResult()
    for line in done.stdout.splitlines():
        result.record(line)
    return result.losses, load_checkpoint_files(final_checkpoint(save_dir))


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "copy"), [(1, "after describing"), (2, "after describing"), (3, "overlapped")])
def test_sigkill_of_the_trainer_loses_at_most_the_step_in_flight(tmp_path, monkeypatch, reference, seed, copy):
    if copy == "overlapped":  # the copy of a big state, begun in a thread before the state is described
        monkeypatch.setenv(step_snapshots.OVERLAP_ENV, "0")
    kill_after = sorted(random.Random(seed).sample(range(2, 34), 3))
    code, result, kills = run_killing_the_trainer(supervised(tmp_path, "--step_delay", "0.05"), kill_after, seed)
    output = result.outputs[-1]
    assert code == 0, output[-3000:]
    assert len(kills) == 3 and all(resumed is not None for _, resumed in kills), (kills, output[-3000:])
    replayed = [last - resumed for last, resumed in kills]
    assert all(0 <= r <= 1 for r in replayed), (kills, output[-3000:])  # the step in flight, at most
    assert output.count("snapshot from shared memory") >= sum(1 for r in replayed if r < 1)
    assert result.replay_mismatches == [] and result.losses == reference[0]
    assert deep_equal(load_checkpoint_files(final_checkpoint(tmp_path)), reference[1]) == []
    reasons = [Catalog(SaveDir(tmp_path)).verify(ref.path)["reason"] for ref in SaveDir(tmp_path).committed()]
    assert reasons[-1] == "final"


SLOT_WRITER = """
import sys, time
from telepathy.disk import slots
writer, step, chunk = slots.SlotWriter(sys.argv[1]), 0, 1 << 16
print("ready", flush=True)
while True:
    step += 1
    def fill(mapping, at, length, value=step % 251):
        for start in range(0, length, chunk):  # slowly, so that kills land mid-copy
            mapping[at + start : at + start + min(chunk, length - start)] = bytes([value]) * min(chunk, length - start)
            time.sleep(0.0005)
    writer.write(step, {"info": {}}, 4 << 20, fill)
"""


def test_a_torn_snapshot_is_never_read(tmp_path):
    """Negative control for the double buffer: SIGKILL a writer at random moments of its copies; the newest complete
    snapshot is always self-consistent (every byte is its step's value) and a torn slot is never chosen."""
    rng = random.Random(0)
    for _ in range(8):
        slots.clear_slots(tmp_path)
        proc = subprocess.Popen([sys.executable, "-c", SLOT_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.15 + rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        found = slots.read_newest(tmp_path)
        assert found is not None
        meta, data = found
        assert set(data) == {meta["step"] % 251}, f"step {meta['step']}: a torn copy was read"
    header = bytearray((tmp_path / "slot0").read_bytes()[:64])  # and a header that says "being written" is refused
    with open(tmp_path / "slot0", "r+b") as f, open(tmp_path / "slot1", "r+b") as g:
        for h in (f, g):
            h.seek(16)
            h.write(b"\0" * 8)  # seq_end = 0
    assert slots.read_newest(tmp_path) is None and len(header) == 64


def test_a_supervisor_killed_during_its_rescue_leaves_the_previous_checkpoint(tmp_path):
    save, slot_dir = tmp_path / "save", tmp_path / "slots"
    slot_dir.mkdir()
    model = nn.Linear(64, 64)
    with Checkpointer(save, parts={"model": model}) as ckpt:
        ckpt.save(TrainState(global_step=1), "interval")
        with torch.no_grad():
            model.weight.add_(1.0)
        state = TrainState(global_step=2, batch_idx=2)
        options = dataclasses.asdict(ckpt.options)
        StepSnapshots(slot_dir).capture(2, ckpt._files(state), ckpt._info(state, "rescue", None), options)
    code = (f"from telepathy.rescue import rescue; from pathlib import Path; "
            f"print(rescue(Path({str(slot_dir)!r}), Path({str(save)!r}), 'test'))")  # fmt: skip
    env = {**os.environ, "TELEPATHY_TEST_SAVE_STEP_PAUSE": "0.2"}
    for delay in (0.3, 0.9, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        newest = Catalog(SaveDir(save)).newest_valid()
        assert newest is not None and newest[0].step in (1, 2)  # the old one, or the whole rescue: nothing torn
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Catalog(SaveDir(save)).newest_valid()[0].step == 2
    rescued = Checkpointer(save, parts={"model": nn.Linear(64, 64)})
    rescued.resume()
    assert torch.equal(rescued.parts["model"].weight, model.weight)
    rescued.close()


@pytest.mark.slow
def test_the_whole_tree_killed_at_once_loses_at_most_one_commit(tmp_path, reference):
    """Node loss: supervisor and trainer SIGKILLed together, nothing in memory survives. With a durable save at
    every step, written in the background and coalesced (latest wins), the rerun replays at most the steps of one
    commit plus the one in flight, and finishes bit-identically."""
    command = supervised(tmp_path, "--step_delay", "0.05", "--save_every_steps", "1", "--async_save")
    rng, result, replayed = random.Random(5), RunResult(), []
    for kill_after in (4, 13, 27, None):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        printed, lines = 0, []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            result.record(line)
            if line.startswith("PID ") and replayed and replayed[-1][1] is None:
                replayed[-1] = (replayed[-1][0], int(RESUMED.search(line).group(1)))
            match = STEP_LINE.match(line)
            if match:
                printed = int(match.group("step"))
                if kill_after is not None and printed >= kill_after:
                    time.sleep(rng.uniform(0, 0.08))
                    os.killpg(proc.pid, signal.SIGKILL)
                    replayed.append((printed, None))
                    kill_after = None
        code = proc.wait(timeout=60)
        result.outputs.append("".join(lines))
    assert code == 0, result.outputs[-1][-3000:]
    losses = [last - resumed for last, resumed in replayed]
    tails = "\n---\n".join(out[-1500:] for out in result.outputs)
    assert len(losses) == 3 and all(0 <= n <= 3 for n in losses), f"{replayed}\n{tails}"
    assert result.replay_mismatches == [] and result.losses == reference[0]
    assert deep_equal(load_checkpoint_files(final_checkpoint(tmp_path)), reference[1]) == []
