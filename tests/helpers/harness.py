"""Drive ``telepathy.test_preemption`` as a real subprocess: deliver real signals at chosen steps, restart it
after each exit, and collect every loss it printed. Shared by the subprocess and exactness tests."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from telepathy.disk.manifest import verify_directory
from telepathy.store.checkpoint_store import CheckpointStore

STEP_LINE = re.compile(r"^step (?P<step>\d+)(?:/\d+)? epoch \d+ (?:batch \d+ )?loss (?P<loss>\S+) ")
TRAINER = [sys.executable, "-m", "telepathy.test_preemption"]
# The negative control: the same trainer with RNG restoration switched off.
BROKEN_TRAINER = [
    sys.executable,
    "-c",
    "import sys, telepathy.rng as r; r.restore_rng_state = lambda *a, **k: None; "
    "sys.argv[0] = 'broken'; import telepathy.test_preemption as t; t.main()",
]


def small_run_args(save_dir: Path, *extra: str) -> list[str]:
    """A deterministic run of 3 epochs x 12 batches = 36 steps, every step logged."""
    return [
        "--save_dir", str(save_dir), "--epochs", "3", "--samples", "96", "--batch_size", "8",
        "--log_every", "1", "--interval", "1000", "--duration", "600", *extra,
    ]  # fmt: skip


@dataclass
class Interrupt:
    """Deliver ``sig`` once the trainer printed step ``at_step`` (0: as soon as it started). ``then_kill_after``
    adds a SIGKILL that many seconds later (used to kill during the save that ``sig`` requested)."""

    at_step: int
    sig: int
    then_kill_after: float | None = None


@dataclass
class RunResult:
    losses: dict[int, str] = field(default_factory=dict)  # step -> float.hex of its loss (first seen)
    replay_mismatches: list[str] = field(default_factory=list)  # a re-run step whose loss differed
    exit_codes: list[int] = field(default_factory=list)
    interrupts_delivered: int = 0
    outputs: list[str] = field(default_factory=list)

    def record(self, line: str) -> None:
        match = STEP_LINE.match(line)
        if not match:
            return
        step, loss = int(match.group("step")), match.group("loss")
        if step in self.losses and self.losses[step] != loss:
            self.replay_mismatches.append(f"step {step}: {self.losses[step]} then {loss}")
        self.losses.setdefault(step, loss)


def run_once(
    args: list[str],
    interrupts: list[Interrupt],
    result: RunResult,
    *,
    trainer: list[str] = TRAINER,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> int:
    """Start the trainer, deliver ``interrupts`` in order as each falls due, wait for exit; returns the exit
    code."""
    proc = subprocess.Popen(
        trainer + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    killer: threading.Timer | None = None
    timed_out: list[bool] = []

    def on_timeout() -> None:
        timed_out.append(True)
        _kill_quietly(proc)

    watchdog = threading.Timer(timeout, on_timeout)
    watchdog.start()
    pending = list(interrupts)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            result.record(line)
            if not pending:
                continue
            interrupt = pending[0]
            match = STEP_LINE.match(line)
            started = line.startswith("PID ")
            if (interrupt.at_step == 0 and started) or (match and int(match.group("step")) >= interrupt.at_step):
                pending.pop(0)
                proc.send_signal(interrupt.sig)
                result.interrupts_delivered += 1
                if interrupt.then_kill_after is not None:
                    killer = threading.Timer(interrupt.then_kill_after, _kill_quietly, args=(proc,))
                    killer.start()
        code = proc.wait(timeout=timeout)
    finally:
        watchdog.cancel()
        if killer is not None:
            killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out:
        raise TimeoutError(f"trainer ran past {timeout} s; last output:\n" + "".join(lines[-30:]))
    result.exit_codes.append(code)
    result.outputs.append("".join(lines))
    return code


def _kill_quietly(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_schedule(
    save_dir: Path,
    schedule: list[list[Interrupt]],
    *,
    extra_args: tuple[str, ...] = (),
    trainer: list[str] = TRAINER,
    env: dict[str, str] | None = None,
    max_runs: int = 40,
) -> RunResult:
    """Run to completion: invocation i gets the interrupts ``schedule[i]`` (later ones none); after every
    exit, check that ``latest`` never names a torn checkpoint."""
    result = RunResult()
    for invocation in range(max_runs):
        interrupts = schedule[invocation] if invocation < len(schedule) else []
        code = run_once(small_run_args(save_dir, *extra_args), interrupts, result, trainer=trainer, env=env)
        assert_latest_not_torn(save_dir)
        if code not in (0, 99, 130, -signal.SIGKILL):
            raise AssertionError(f"trainer exited {code}:\n{result.outputs[-1][-3000:]}")
        if code == 0 and invocation >= len(schedule) - 1:
            return result
    raise AssertionError(f"run did not finish within {max_runs} invocations")


def assert_latest_not_torn(save_dir: Path) -> None:
    """``latest``, when present, must resolve to a committed checkpoint that verifies."""
    pointer = CheckpointStore(save_dir).latest_pointer()
    if pointer is not None:
        verify_directory(pointer)


def final_checkpoint(save_dir: Path) -> Path:
    found = CheckpointStore(save_dir).newest_valid()
    assert found is not None, f"no valid checkpoint in {save_dir}"
    return found[0].path


def load_checkpoint_files(directory: Path) -> dict[str, object]:
    return {name: CheckpointStore.load_part(directory, name) for name in ("model", "optimizer", "state")}


def deep_equal(a: object, b: object, path: str = "") -> list[str]:
    """Exact structural comparison; returns the paths that differ (timestamps and metadata excluded)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [] if a.keys() == b.keys() else [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        for key in a.keys() & b.keys():
            if key in ("timestamp", "metadata"):
                continue
            diffs += deep_equal(a[key], b[key], f"{path}/{key}")
        return diffs
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in deep_equal(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a.hex() == b.hex() else [f"{path}: {a.hex()} vs {b.hex()}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


RESUMED = re.compile(r"\(global step (\d+)\)")


def run_killing_the_trainer(
    command: list[str],
    kill_after_steps: list[int],
    seed: int,
    *,
    env: dict[str, str] | None = None,
    jitter: float = 0.08,
) -> tuple[int, RunResult, list]:
    """Run the supervisor; SIGKILL its trainer (only the trainer) a random fraction of a step after it printed each
    step in ``kill_after_steps``. Returns the exit code, the losses, and per kill (last step printed, resumed at)."""
    rng = random.Random(seed)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=None if env is None else {**os.environ, **env})  # fmt: skip
    result, pending, kills = RunResult(), list(kill_after_steps), []
    trainer_pid, printed, lines = None, 0, []
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            result.record(line)
            if line.startswith("PID "):
                if kills:
                    kills[-1] = (printed, int(RESUMED.search(line).group(1)))
                trainer_pid, printed = int(line.split()[1]), 0
            match = STEP_LINE.match(line)
            if match:
                printed = int(match.group("step"))
                if pending and printed >= pending[0] and trainer_pid is not None:
                    pending.pop(0)
                    kills.append((printed, None))
                    threading.Timer(rng.uniform(0, jitter), os.kill, (trainer_pid, signal.SIGKILL)).start()
                    trainer_pid = None
        code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    result.outputs.append("".join(lines))
    return code, result, kills


def telepathy_in_process(*args: str) -> subprocess.CompletedProcess:
    """The ``telepathy`` command run in this process (argument parsing, output and exit code as in a shell; no torch
    import per call)."""
    from telepathy.__main__ import main  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def blob_location(save_dir: Path, name: str) -> tuple[Path, int, int]:
    """``(file, offset, bytes)`` of blob ``name`` as the newest manifest naming it says: its own file, or its
    place in a pack."""
    from telepathy.disk.manifest import read_manifest
    from telepathy.disk.save_dir import SaveDir

    for directory in reversed(sorted(Path(save_dir, "checkpoints").glob("step_*"))):
        entry = (read_manifest(directory).get("blobs") or {}).get(name)
        if entry is not None:
            return SaveDir(save_dir).blob_file(name, entry), entry.get("offset", 0), entry["bytes"]
    raise KeyError(f"no checkpoint in {save_dir} references blob {name}")


def damage_blob(save_dir: Path, name: str, how: str = "flip") -> Path:
    """Damage blob ``name`` in place, only its own bytes (a pack's other blobs stay intact): ``flip`` one bit,
    or ``zero`` all of it. Returns the file."""
    path, offset, nbytes = blob_location(save_dir, name)
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(nbytes))
        if how == "flip":
            data[min(100, nbytes - 1)] ^= 1
        else:
            data[:] = bytes(nbytes)
        f.seek(offset)
        f.write(data)
    return path


# Every way a Checkpointer can write a checkpoint (its options): a state must come back the same from each.
SAVE_MODES = {
    "full": {},
    "async": {"async_save": True},
    "differential": {"differential": True},
    "compressed": {"format": "compressed"},
    "differential async": {"differential": True, "async_save": True},
}
