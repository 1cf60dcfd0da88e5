"""Hard kills, measured side by side in one run: what per-step protection costs a training loop, and how many steps
a SIGKILL at a random instant makes a run replay, with and without it. Prints medians and ratios.

    python benchmarks/hard_kill_bench.py                  # full size (about 10-15 minutes on 2 cores)
    python benchmarks/hard_kill_bench.py --dir /scratch/bench --sections 2,3
    python benchmarks/hard_kill_bench.py --smoke          # every section at a tiny size (a test runs this)

1. Per-step overhead on the main job's default LatentWire workload (``python -m telepathy.preemptible_training
   --samples S --epochs 1 --log_every 1 --threads 1``), as real processes: wall time per step after start-up (from
   the arrival of the line for step k0 to the arrival of the last step line, timestamped as lines arrive), median
   over repeats alternated A B C C B A ..., for no per-step protection (``--checkpoint_interval 600``),
   ``--snapshot_every_step`` and ``--save_every_steps 1 --async_save``; ratios against the first. One torch thread
   (``--main_job_threads``; the job's default is 2): on a 2-core machine that other jobs share, two intra-op threads
   make each small op wait for whichever thread was descheduled, and the same run took 50 to 850 ms a step; one
   thread does the same work per step with a fraction of that spread. Separate runs differ by a few percent on a
   shared machine, more than the 2% target, so each round also runs one ``--snapshot_every_step`` job of twice the
   steps whose trainer skips the snapshot in every other block of 6 steps (a sitecustomize hook): steps with and
   without a snapshot in the same process, seconds apart, compared pair of blocks by pair of blocks.
2. A 100 MiB state (an nn.Linear stack of 8.66M parameters + its AdamW moments) with a ~40 ms step of real compute
   (forward, backward and AdamW step of that model on a batch sized at start to take ~40 ms; one torch thread,
   ``--threads``), in this process:
   per-step time without protection (a Checkpointer with a 600 s interval), with per-step snapshots into
   shared-memory slots and with ``every_steps=1, async_save=True``, in blocks of steps alternated between the three
   (the first step of a block left out; the kernel's write-back of an async block's pages finished before the
   next); the floor is a copy of every tensor of the model and optimizer state into preallocated buffers.
3. Steps replayed after a SIGKILL at a random instant of a step (``telepathy.test_preemption`` with
   ``--step_delay``): (a) ``--interval 600``, no per-step protection, the trainer killed under its supervisor;
   (b) ``--snapshot_every_step``, the trainer killed, the supervisor alive (it commits the newest snapshot and
   restarts the trainer); (c) ``--save_every_steps 1 --async_save``, the whole process tree killed at once, then
   the same command run again. Replayed = the last step printed before the kill - the global step resumed at.
   (b) and (c) run to the end and every step's loss (float.hex, replayed steps too) is compared with an
   uninterrupted run's.

Repeats: section 1 runs 3 to 7 rounds (no new round after 300 s), section 2 6 to 12 rounds (no new round after
100 s), section 3 20 kills per case; so the full size stays near 10-15 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import adamw_step, batch_for_step_ms, usable_dir

LW_STEP = re.compile(r"^step (?P<step>\d+)/(?P<total>\d+) epoch \d+ loss (?P<loss>\S+) ")
TP_STEP = re.compile(r"^step (?P<step>\d+) epoch \d+ batch \d+ loss (?P<loss>\S+) ")
TP_START = re.compile(r"^PID (?P<pid>\d+) training in .* \(global step (?P<step>\d+)\)")
MAIN_JOB = [sys.executable, "-m", "telepathy.preemptible_training"]
TEST_TOOL = [sys.executable, "-m", "telepathy.test_preemption"]
SAMPLES_PER_EPOCH, BATCH = 96, 8  # section 3: 12 steps per epoch
STEPS_PER_EPOCH = SAMPLES_PER_EPOCH // BATCH


STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(f"hard_kill_bench [{time.monotonic() - STARTED:4.0f} s]: {message}", file=sys.stderr, flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def child_env(extra: dict[str, str] | None = None, first_on_path: Path | None = None) -> dict[str, str]:
    """The children import this checkout's telepathy even when it is not installed."""
    paths = [*([str(first_on_path)] if first_on_path else []), str(Path(__file__).resolve().parents[1])]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", **(extra or {})}


BOUNDARY_LOG_ENV = "HARD_KILL_BENCH_BOUNDARY_LOG"
ALTERNATE_ENV = "HARD_KILL_BENCH_ALTERNATE"  # steps per block; odd blocks skip the snapshot
# A sitecustomize for section 1: in the trainer only (the supervisor gives it TELEPATHY_REPORT_FD), time every
# Checkpointer.step_boundary and write "step seconds end skipped" lines at exit (end: perf_counter when the boundary
# returned). With ALTERNATE_ENV=N, boundaries of steps in odd blocks of N steps take no snapshot: the same process
# measures its steps with and without, side by side. The command line stays the main job's own.
BOUNDARY_HOOK = f"""
import os
if os.environ.get({BOUNDARY_LOG_ENV!r}) and os.environ.get("TELEPATHY_REPORT_FD"):
    import atexit, time
    from telepathy import checkpointer as _checkpointer
    _real, _took = _checkpointer.Checkpointer.step_boundary, []
    _block = int(os.environ.get({ALTERNATE_ENV!r}) or 0)
    def _timed(self, state, *args, **kwargs):
        skip = bool(_block) and (state.global_step // _block) % 2 == 1
        kept = self._snapshots
        started = time.perf_counter()
        try:
            if skip:
                self._snapshots = None
            return _real(self, state, *args, **kwargs)
        finally:
            self._snapshots = kept
            ended = time.perf_counter()
            _took.append((state.global_step, ended - started, ended, int(skip)))
    _checkpointer.Checkpointer.step_boundary = _timed
    def _write(path=os.environ[{BOUNDARY_LOG_ENV!r}]):
        with open(path, "w") as f:
            f.writelines(f"{{step}} {{seconds!r}} {{end!r}} {{skip}}\\n" for step, seconds, end, skip in _took)
    atexit.register(_write)
"""


def read_boundary_log(path: Path) -> list[tuple[int, float, float, bool]]:
    """(step, seconds in step_boundary, perf_counter at its end, snapshot skipped) per step, as the hook wrote."""
    rows = (line.split() for line in path.read_text().splitlines())
    return [(int(step), float(sec), float(end), skip == "1") for step, sec, end, skip in rows]


def alternated_blocks(log: list[tuple[int, float, float, bool]], k0: int, block: int) -> list[tuple[float, float]]:
    """(mean step with snapshots, mean step without) for each pair of neighbouring blocks after step ``k0``. A step
    is from the end of one step_boundary to the end of the next; the first step of a block is left out (it follows
    the other mode's boundary)."""
    ends = {step: (end, skip) for step, _, end, skip in log}
    means: dict[int, tuple[bool, float]] = {}
    for b in range(k0 // block + 1, max(ends) // block):
        steps = [k for k in range(b * block + 1, (b + 1) * block) if k in ends and k - 1 in ends]
        if len(steps) == block - 1:
            means[b] = (ends[steps[0]][1], statistics.fmean(ends[k][0] - ends[k - 1][0] for k in steps))
    return [(means[b][1], means[b + 1][1]) for b in means if b + 1 in means and not means[b][0] and means[b + 1][0]]


class Tree:
    """A supervisor (or any command) in a session of its own, its merged output read line by line with the time
    each line arrived; :meth:`kill_all` SIGKILLs the whole session at once."""

    live: set[Tree] = set()  # killed when the benchmark stops early (Ctrl+C, an error)

    def __init__(self, command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(command, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        Tree.live.add(self)
        self.lines: list[tuple[float, str]] = []
        self.killed_all = False
        self.timed_out = False
        self._watchdog = threading.Timer(timeout, self._on_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.kill_all()

    def kill_all(self) -> bool:
        """SIGKILL every process of the session; False when it had already ended."""
        if self.proc.poll() is not None:
            return False
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.killed_all = True
        return True

    def __iter__(self):
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            self.lines.append((now, line))
            yield now, line

    def finish(self, what: str) -> int:
        """Read to the end, wait; a run past its timeout is an error. Cleans up the shared-memory slot directory
        of a supervisor that was SIGKILLed (it cannot remove it itself)."""
        for _ in self:
            pass
        code = self.proc.wait()
        self._watchdog.cancel()
        Tree.live.discard(self)
        if self.killed_all:
            remove_leaked_slot_dirs(self.proc.pid)
        if self.timed_out:
            tail = "".join(line for _, line in self.lines[-25:])
            raise RuntimeError(f"{what} ran past its timeout; last output:\n{tail}")
        return code

    def output(self) -> str:
        return "".join(line for _, line in self.lines)


def remove_leaked_slot_dirs(pid: int) -> None:
    """``telepathy.disk.slots.make_slot_dir`` names its directory after the supervisor's pid; a supervisor killed
    with SIGKILL leaves it behind (with snapshots in it, up to twice the state in shared memory)."""
    for base in {Path("/dev/shm"), Path(tempfile.gettempdir())}:
        if base.is_dir():
            for leaked in base.glob(f"telepathy-{pid}-*"):
                shutil.rmtree(leaked, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- section 1
def section1(root: Path, smoke: bool, threads: int | None) -> None:
    samples, k0, min_rounds, max_rounds, budget = (64, 2, 1, 1, 0) if smoke else (1200, 20, 3, 7, 300)
    block = 3 if smoke else 6  # the alternated run: blocks of this many steps, with and without snapshots
    variants = [
        ("no per-step protection (`--checkpoint_interval 600`)", []),
        ("`--snapshot_every_step`", ["--snapshot_every_step"]),
        ("`--save_every_steps 1 --async_save`", ["--save_every_steps", "1", "--async_save"]),
    ]
    spans: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    gaps: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    boundary: dict[int, list[float]] = {i: [] for i in range(len(variants))}  # mean seconds per step, per run
    pairs: list[tuple[float, float]] = []  # the alternated runs' (with, without) block means
    hook_dir = root / "s1-hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(BOUNDARY_HOOK)
    boundary_log = root / "s1-boundary.log"
    run_no = 0

    def run(extra: list[str], run_samples: int, alternate: int = 0) -> tuple[dict[int, float], list[Any]]:
        """One main job; the arrival time of each step line, and what the hook logged."""
        nonlocal run_no
        run_no += 1
        save_dir = root / f"s1-{run_no}"
        command = [*MAIN_JOB, "--save_dir", str(save_dir), "--samples", str(run_samples), "--epochs", "1",
                   "--log_every", "1", "--checkpoint_interval", "600", *extra,
                   *(["--threads", str(threads)] if threads else [])]  # fmt: skip
        boundary_log.unlink(missing_ok=True)
        env = child_env({BOUNDARY_LOG_ENV: str(boundary_log), ALTERNATE_ENV: str(alternate)}, first_on_path=hook_dir)
        tree = Tree(command, root, timeout=120 if smoke else 600, env=env)
        times: dict[int, float] = {}
        for now, line in tree:
            match = LW_STEP.match(line)
            if match:
                times[int(match.group("step"))] = now
        code = tree.finish("the main job")
        if code != 0:
            raise RuntimeError(f"the main job exited {code}:\n{tree.output()[-3000:]}")
        shutil.rmtree(save_dir, ignore_errors=True)
        return times, read_boundary_log(boundary_log)

    say(f"section 1: LatentWire main job, {samples // 8} steps per run, {min_rounds}..{max_rounds} round(s) of "
        f"{len(variants)} runs and one of {2 * samples // 8} steps alternating blocks of {block} steps with and "
        f"without snapshots (no new round after {budget} s)")  # fmt: skip
    started, rounds = time.monotonic(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.monotonic() - started < budget):
        r, rounds = rounds, rounds + 1
        order = list(range(len(variants)))
        for i in order if r % 2 == 0 else order[::-1]:
            times, log = run(variants[i][1], samples)
            last = max(times)
            spans[i].append((times[last] - times[k0]) / (last - k0))
            steps = sorted(s for s in times if s >= k0)
            gaps[i].append(med([times[b] - times[a] for a, b in zip(steps, steps[1:])]))
            timed = [sec for step, sec, _, _ in log if k0 <= step < last]
            boundary[i].append(statistics.fmean(timed) if timed else math.nan)
        _, log = run(["--snapshot_every_step"], 2 * samples, alternate=block)
        pairs += alternated_blocks(log, k0, block)
    base_span, base_gap = med(spans[0]), med(gaps[0])
    print(f"## 1. Per-step overhead, main job on its default LatentWire workload ({samples // 8} steps of batch 8; "
          f"steps {k0}..{samples // 8} timed; {f'--threads {threads}' if threads else 'its default --threads 2'}; "
          f"median of {rounds} run(s) each, alternated)\n")  # fmt: skip
    print("| main job (LatentWire default) | ms/step after start-up | x no protection | x no protection, same round "
          "(median) | median step gap ms | x no protection | in step_boundary ms/step | 1 + that / no-protection "
          "step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for i, (label, _) in enumerate(variants):
        span, gap, inside = med(spans[i]), med(gaps[i]), med(boundary[i])
        paired = med([a / b for a, b in zip(spans[i], spans[0])])  # run r of each variant is in round r
        print(
            f"| {label} | {span * 1e3:.1f} | {span / base_span:.3f} | {paired:.3f} | {gap * 1e3:.1f} | "
            f"{gap / base_gap:.3f} | {inside * 1e3:.2f} | {1 + (inside - med(boundary[0])) / base_span:.3f} |"
        )
    runs = ", ".join(f"{label.split(' (')[0]}: " + " ".join(f"{s * 1e3:.1f}" for s in spans[i])
                     for i, (label, _) in enumerate(variants))  # fmt: skip
    print(
        f"\nms/step of each run, in order: {runs}. In step_boundary: the mean time per timed step inside the "
        "trainer's Checkpointer.step_boundary (snapshot, save decision, async copy), timed in the trainer by a "
        "sitecustomize hook; the last column adds it (less the no-protection run's) to the no-protection step, an "
        "estimate that other processes' load hardly moves. Target: `--snapshot_every_step` <= 1.02x.\n"
    )
    ratios = sorted(with_ / without for with_, without in pairs)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [math.nan] * 3
    print(f"| `--snapshot_every_step`, same process, alternated blocks of {block} steps | pairs of blocks | ms/step "
          "with snapshots | ms/step without | x without (median of pairs) | quartiles of pairs |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print(
        f"| {rounds} run(s) of {2 * samples // 8} steps | {len(pairs)} | {med([p[0] for p in pairs]) * 1e3:.2f} | "
        f"{med([p[1] for p in pairs]) * 1e3:.2f} | {med(ratios):.4f} | {quartiles[0]:.4f} .. {quartiles[2]:.4f} |"
    )
    print(
        "\nThe same trainer, the same data, at most a few seconds apart: steps whose boundary took a snapshot (even "
        "blocks) against steps whose boundary skipped it (odd blocks; a sitecustomize hook hides the snapshot "
        "writer for their step_boundary). A step runs from the end of one step_boundary to the end of the next, "
        "so it includes what a snapshot leaves for the next step (caches); the first step of each block is left "
        "out. Load from other processes moves both sides of a pair alike. Target: <= 1.02x.\n"
    )


# ------------------------------------------------------------------------------------------------------- section 2
def section2(root: Path, smoke: bool, threads: int | None) -> None:
    import mmap

    import torch
    from torch import nn

    from telepathy import Checkpointer, TrainState, training_signals
    from telepathy.disk import slots

    if threads:
        torch.set_num_threads(threads)
    width, depth, tail = (256, 2, 64) if smoke else (1024, 8, 256)
    min_rounds, max_rounds, budget, steps_per_block, target_ms = (2, 2, 0, 3, 40.0) if smoke else (6, 40, 120, 15, 40.0)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, tail))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())

    def make_step(batch: int) -> Callable[[], None]:
        return adamw_step(model, optimizer, batch, width)

    warm_up = make_step(1)
    for _ in range(5):  # warm-up; the AdamW moments exist from here on
        warm_up()
    # --smoke: a fixed batch (the numbers mean little); else the one whose step is nearest to ~40 ms
    batch = 16 if smoke else batch_for_step_ms(make_step, target_ms, tries=9)
    step = make_step(batch)
    tensors = [t for t in model.state_dict().values()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [torch.empty_like(t) for t in tensors]
    shm_dir = slots.make_slot_dir()  # the same kind of memory the snapshots go to, for the second floor
    slot_dir = slots.make_slot_dir()
    old_env = os.environ.get(slots.SLOT_DIR_ENV)
    os.environ[slots.SLOT_DIR_ENV] = str(slot_dir)  # read when the Checkpointer is constructed
    handlers_were_installed = training_signals.installed()
    if not handlers_were_installed:  # a Checkpointer would install them (and say so); removed again below
        training_signals.install_signal_handlers()
    ckpts: dict[str, Any] = {}
    shm_file, whole, shm_views = None, None, []
    try:
        with open(shm_dir / "floor", "w+b") as f:
            f.truncate(slots.align(state_bytes) + 64 * len(tensors))
            shm_file = mmap.mmap(f.fileno(), 0)
        whole = torch.frombuffer(shm_file, dtype=torch.uint8)
        at = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            shm_views.append(whole[at : at + n].view(t.dtype).view(t.shape))
            at = slots.align(at + n)

        def copy_floor(targets: list[Any]) -> float:
            started = time.perf_counter()
            for b, t in zip(targets, tensors):
                b.copy_(t)
            return time.perf_counter() - started

        parts = {"model": model}
        ckpts = {
            "none": Checkpointer(root / "s2-none", parts=parts, optimizer=optimizer, interval=600),
            "snapshot": Checkpointer(
                root / "s2-snapshot", parts=parts, optimizer=optimizer, snapshot_every_step=True, interval=None
            ),  # fmt: skip
            "async": Checkpointer(
                root / "s2-async", parts=parts, optimizer=optimizer, every_steps=1, async_save=True, interval=None
            ),  # fmt: skip
        }
        states = {name: TrainState() for name in ckpts}
        waits: list[float] = []  # every ckpt.wait() of the async Checkpointer while a step was timed
        saves: list[float] = []  # seconds the loop was blocked per async save (the copy to host buffers)
        commits: list[float] = []
        in_flight = [False]

        async_ckpt = ckpts["async"]
        real_wait, real_save = async_ckpt.wait, async_ckpt.save

        def wait_timed() -> None:
            started = time.perf_counter()
            real_wait()
            if in_flight[0]:
                waits.append(time.perf_counter() - started)

        def save_timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real_save(*args, **kwargs)
            finally:
                if in_flight[0]:
                    saves.append(time.perf_counter() - started)

        async_ckpt.wait, async_ckpt.save = wait_timed, save_timed
        async_ckpt.on_save = lambda report: commits.append(report.seconds)

        def copy_at_boundary(_state: TrainState) -> None:  # the bare copy, where a snapshot is taken
            for b, t in zip(buffers, tensors):
                b.copy_(t)

        boundaries = {name: ckpt.step_boundary for name, ckpt in ckpts.items()} | {"copy": copy_at_boundary}
        states["copy"] = TrainState()
        per_step: dict[str, list[float]] = {name: [] for name in boundaries}  # block means
        in_boundary: dict[str, list[float]] = {name: [] for name in boundaries}  # every step
        floors: dict[str, list[float]] = {"anon": [], "shm": []}

        def block(name: str, n: int, record: bool) -> None:
            boundary, state = boundaries[name], states[name]
            in_flight[0] = record
            ends = [time.perf_counter()]
            for _ in range(n):
                step()
                state.advance(batches_per_epoch=10**9)
                b0 = time.perf_counter()
                boundary(state)
                ends.append(time.perf_counter())
                if record:
                    in_boundary[name].append(ends[-1] - b0)
            in_flight[0] = False
            if record:  # the block's first step follows another variant's boundary: left out; the median step
                kept = ends[1:] if n > 2 else ends  # (one step that met a page-fault storm moves a mean a lot)
                per_step[name].append(med([b - a for a, b in zip(kept, kept[1:])]))
            if name in ckpts:
                ckpts[name].wait()  # untimed: the next block starts without a commit in flight
            if name == "async":
                os.sync()  # and without the kernel still writing its pages back beside the next block

        say(f"section 2: {state_bytes / 2**20:.1f} MiB state, batch {batch}, {min_rounds}..{max_rounds} rounds of "
            f"{steps_per_block} steps per variant (no new round after {budget} s)")  # fmt: skip
        for name in boundaries:  # warm-up: slot files mapped and touched, host buffers allocated
            block(name, 3, record=False)
        if slots.read_newest(slot_dir) is None:
            raise RuntimeError(f"the snapshot Checkpointer wrote no snapshot into {slot_dir}")
        for _ in range(3):
            copy_floor(buffers)
            copy_floor(shm_views)
        names = list(boundaries)
        paired: dict[str, list[float]] = {name: [] for name in names}
        started, rounds = time.monotonic(), 0
        while rounds < max_rounds and (rounds < min_rounds or time.monotonic() - started < budget):
            r, rounds = rounds, rounds + 1
            for name in names if r % 2 == 0 else names[::-1]:
                block(name, steps_per_block, record=True)
            for name in names:
                paired[name].append(per_step[name][-1] - per_step["none"][-1])
            for _ in range(3):
                floors["anon"].append(copy_floor(buffers))
                floors["shm"].append(copy_floor(shm_views))
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
        if shm_file is not None:
            whole, shm_views = None, []  # the views must go before the mapping can be closed
            shm_file.close()
        slots.remove_slot_dir(shm_dir)
        slots.remove_slot_dir(slot_dir)
        if not handlers_were_installed:
            training_signals.uninstall_signal_handlers()  # Ctrl+C interrupts the benchmark again
        if old_env is None:
            os.environ.pop(slots.SLOT_DIR_ENV, None)
        else:
            os.environ[slots.SLOT_DIR_ENV] = old_env
    floor = med(floors["anon"])
    measured = len(in_boundary["async"])
    long_waits = [w for w in waits if w > 1e-3]
    waited = (f"never ({len(waits)} waits, max {max(waits, default=0) * 1e3:.2f} ms)" if not long_waits
              else f"{len(long_waits)} times > 1 ms, max {max(long_waits) * 1e3:.1f} ms")  # fmt: skip
    rows = [
        ("no per-step protection (interval 600 s)", "none", "-"),
        ("per-step snapshot to shared memory", "snapshot", "no (copies only)"),
        ("every_steps=1, async_save=True", "async", waited),
        ("the bare copy at each step boundary: every tensor into preallocated buffers", "copy", "-"),
    ]
    print(f"## 2. {state_bytes / 2**20:.1f} MiB state ({params / 1e6:.2f}M parameters + AdamW), a "
          f"{med(per_step['none']) * 1e3:.0f} ms step of real compute (forward, backward, AdamW step; batch {batch}), "
          f"in-process, {torch.get_num_threads()} torch threads; {rounds} rounds x {steps_per_block} steps per "
          "variant, alternated; medians\n")  # fmt: skip
    in_situ = med(paired["copy"])
    print("| in-process loop, state of model + AdamW | ms/step | overhead ms/step | overhead / the bare copy's "
          "| overhead / copy floor | in step_boundary ms | boundary / copy floor | loop waited on disk |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, name, wait_text in rows:
        over = med(paired[name]) if name != "none" else 0.0
        boundary = med(in_boundary[name])
        print(f"| {label} | {med(per_step[name]) * 1e3:.2f} | {over * 1e3:+.2f} | {over / in_situ:.2f} | "
              f"{over / floor:.2f} | {boundary * 1e3:.2f} | {boundary / floor:.2f} | {wait_text} |")  # fmt: skip
    print(
        f"| copy floor: every tensor into preallocated buffers, between blocks | {floor * 1e3:.2f} | | | 1.00 | | | |"
    )
    shm = med(floors["shm"])
    print(
        f"| copy of the same tensors into a /dev/shm mapping, between blocks | {shm * 1e3:.2f} | | | "
        f"{shm / floor:.2f} | | | |"
    )
    mean_boundary = statistics.fmean(in_boundary["async"]) if in_boundary["async"] else math.nan
    snap = med(in_boundary["snapshot"])
    print(f"\nOverhead = median over rounds of (the variant's median step - the no-protection median step of the "
          f"same round). Async: {len(saves)} saves started in {measured} timed steps (the others skipped: latest "
          "wins), "
          f"loop blocked {med(saves) * 1e3:.1f} ms per save started (median), {mean_boundary * 1e3:.2f} ms per step "
          f"on average in step_boundary; commits took {med(commits) * 1e3:.0f} ms (median). Snapshot: "
          f"{snap * 1e3:.2f} ms in step_boundary, of which {floor * 1e3:.2f} ms is the copy floor and "
          f"{(snap - floor) * 1e3:.2f} ms the rest (state_dict, RNG capture, describing the state, its JSON meta); "
          f"the step itself slows by the remaining {(med(paired['snapshot']) - snap) * 1e3:+.2f} ms. The bare "
          f"copy, done where a snapshot is taken (right after the step, its tensors just written), costs the loop "
          f"{in_situ * 1e3:.2f} ms a step: {med(in_boundary['copy']) * 1e3:.2f} ms in the copy and the rest in the "
          f"next step. The copy floor, timed between blocks, is that copy without the step around it. Target: "
          f"snapshot overhead / the copy of the state <= 1.1.\n")  # fmt: skip


# ------------------------------------------------------------------------------------------------------- section 3
@dataclass
class KillRecord:
    printed: int = -1  # the last step the killed process printed
    resumed: int | None = None  # the global step the next trainer started from
    killed_at: float = 0.0
    resumed_after: float | None = None  # seconds from the kill to the next trainer's start line


@dataclass
class Losses:
    first: dict[int, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def record(self, step: int, loss: str) -> None:
        if step in self.first and self.first[step] != loss:
            self.mismatches.append(f"step {step}: {self.first[step]} then {loss}")
        self.first.setdefault(step, loss)


def tool_args(save_dir: Path, epochs: int, step_delay: float, *extra: str) -> list[str]:
    return ["--save_dir", str(save_dir), "--epochs", str(epochs), "--samples", str(SAMPLES_PER_EPOCH),
            "--batch_size", str(BATCH), "--log_every", "1", "--interval", "600", "--duration", "3600",
            "--step_delay", str(step_delay), *extra]  # fmt: skip


def supervised(save_dir: Path, max_restarts: int, backoff: float, trainer_args: list[str]) -> list[str]:
    return [*MAIN_JOB, "--save_dir", str(save_dir), "--grace_period", "60", "--max_restarts", str(max_restarts),
            "--restart_backoff", str(backoff), "--", *TEST_TOOL, *trainer_args]  # fmt: skip


class Killer:
    """Kill targets: ``pick()`` draws the step after a resume point at which to kill, and the kill lands a random
    fraction of a step (from the step gaps seen so far) after that step's line arrived."""

    def __init__(self, rng: random.Random, k_range: tuple[int, int], step_delay: float) -> None:
        self.rng, self.k_range, self.gaps, self.default_gap = rng, k_range, [], step_delay + 0.005

    def pick(self, resumed: int) -> int:
        return resumed + self.rng.randint(*self.k_range)

    def saw_gap(self, gap: float) -> None:
        if 0 < gap < 1:
            self.gaps.append(gap)

    def later(self, action: Callable[[], Any]) -> None:
        gap = med(self.gaps[-20:]) if len(self.gaps) >= 3 else self.default_gap
        timer = threading.Timer(self.rng.uniform(0, gap), action)
        timer.daemon = True
        timer.start()


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def trainer_kills(root: Path, name: str, tool: list[str], kills: int, killer: Killer, *, finish: bool,
                  backoff: float, losses: Losses, timeout: float) -> tuple[list[KillRecord], str]:  # fmt: skip
    """One supervisor: SIGKILL its trainer (only the trainer) ``kills`` times; after the last restart either let the
    run finish (``finish``) or SIGKILL the whole tree. Returns the kills and the output."""
    tree = Tree(supervised(root / name, kills + 2, backoff, tool), root, timeout)
    records: list[KillRecord] = []
    pid, target, printed, last_line = None, None, 0, None
    for now, line in tree:
        start = TP_START.match(line)
        if start:
            resumed = int(start.group("step"))
            if records:
                records[-1].printed, records[-1].resumed = printed, resumed
                records[-1].resumed_after = now - records[-1].killed_at
            if len(records) == kills and not finish:
                tree.kill_all()
                continue
            pid, printed, last_line = int(start.group("pid")), resumed, None
            target = killer.pick(resumed) if len(records) < kills else None
            continue
        match = TP_STEP.match(line)
        if not match:
            continue
        step = int(match.group("step"))
        losses.record(step, match.group("loss"))
        printed = max(printed, step)
        if last_line is not None:
            killer.saw_gap(now - last_line)
        last_line = now
        if target is not None and step >= target and pid is not None:
            record = KillRecord()
            records.append(record)

            def kill(victim: int = pid, record: KillRecord = record) -> None:
                record.killed_at = time.perf_counter()
                kill_pid(victim)

            killer.later(kill)
            pid = target = None
    code = tree.finish(f"supervisor {name}")
    if finish and code != 0:
        raise RuntimeError(f"supervisor {name} exited {code}:\n{tree.output()[-3000:]}")
    return [r for r in records if r.resumed is not None], tree.output()


def tree_kills(root: Path, name: str, tool: list[str], kills: int, killer: Killer, *, losses: Losses,
               timeout: float) -> tuple[list[KillRecord], list[str]]:  # fmt: skip
    """SIGKILL the whole process tree (supervisor and trainer at once) ``kills`` times, each time running the same
    command again, then let the last one finish."""
    command = supervised(root / name, 2, 0.1, tool)
    records: list[KillRecord] = []
    outputs = []
    while True:
        tree = Tree(command, root, timeout)
        target, printed, last_line = None, 0, None
        for now, line in tree:
            start = TP_START.match(line)
            if start:
                resumed = int(start.group("step"))
                if records and records[-1].resumed is None:
                    records[-1].resumed, records[-1].resumed_after = resumed, now - records[-1].killed_at
                printed = resumed
                target = killer.pick(resumed) if len(records) < kills else None
                continue
            match = TP_STEP.match(line)
            if not match:
                continue
            step = int(match.group("step"))
            losses.record(step, match.group("loss"))
            printed = max(printed, step)
            if last_line is not None:
                killer.saw_gap(now - last_line)
            last_line = now
            if target is not None and step >= target:
                record = KillRecord()
                records.append(record)

                def kill(tree: Tree = tree, record: KillRecord = record) -> None:
                    record.killed_at = time.perf_counter()
                    tree.kill_all()

                killer.later(kill)
                target = None
        code = tree.finish(f"supervisor {name}")
        outputs.append(tree.output())
        if records and records[-1].printed < 0:  # this invocation was the one killed
            if not tree.killed_all:
                records.pop()  # it finished before the kill landed
            else:
                records[-1].printed = printed
                continue
        if code != 0:
            raise RuntimeError(f"supervisor {name} exited {code}:\n{outputs[-1][-3000:]}")
        return [r for r in records if r.resumed is not None], outputs


def section3(root: Path, smoke: bool, seed: int) -> None:
    from telepathy.disk.events import read_events

    kills = 3 if smoke else 20
    k_range = (2, 4) if smoke else (2, 10)
    step_delay = 0.05
    epochs = math.ceil((kills * k_range[1] + 6) / STEPS_PER_EPOCH)
    total = epochs * STEPS_PER_EPOCH
    rng = random.Random(seed)
    timeout = 300 if smoke else 900
    say(f"section 3: {kills} kills per case, runs of {total} steps, --step_delay {step_delay}")

    ref_dir = root / "s3-reference"
    tree = Tree([*TEST_TOOL, *tool_args(ref_dir, epochs, 0.0)], root, timeout)
    reference = Losses()
    for _, line in tree:
        match = TP_STEP.match(line)
        if match:
            reference.record(int(match.group("step")), match.group("loss"))
    if tree.finish("the reference run") != 0 or len(reference.first) != total:
        raise RuntimeError(f"the reference run failed:\n{tree.output()[-3000:]}")

    results: list[tuple[str, list[KillRecord], str, str]] = []  # label, kills, bit-identical, note

    # (a) today: a 600 s interval, no per-step protection; the supervisor restarts the killed trainer
    say("section 3 (a): --interval 600, trainer killed")
    killer = Killer(rng, k_range, step_delay)
    records_a: list[KillRecord] = []
    group = 0
    while len(records_a) < kills:  # restarts without progress back off exponentially: at most 8 per supervisor
        group += 1
        want = min(8, kills - len(records_a))
        got, _ = trainer_kills(root, f"s3a-{group}", tool_args(root / f"s3a-{group}", epochs, step_delay), want,
                               killer, finish=False, backoff=0.002, losses=Losses(), timeout=timeout)  # fmt: skip
        records_a += got
        if not got:
            raise RuntimeError("case (a): no kill landed")
    gap_a = med(killer.gaps)
    results.append(("(a) `--interval 600`, no per-step protection; trainer killed, supervisor restarts it",
                    records_a, "n/a (nothing committed: restarts from step 0)",
                    f"bound: the interval, 600 s = {600 / gap_a:.0f} steps of {gap_a * 1e3:.0f} ms"))  # fmt: skip

    # (b) per-step snapshots; the trainer killed, the supervisor commits the newest snapshot and restarts it
    say("section 3 (b): --snapshot_every_step, trainer killed")
    losses_b = Losses()
    killer = Killer(rng, k_range, step_delay)
    records_b, output_b = trainer_kills(root, "s3b", tool_args(root / "s3b", epochs, step_delay,
                                        "--snapshot_every_step"), kills, killer, finish=True, backoff=0.1,
                                        losses=losses_b, timeout=timeout)  # fmt: skip
    same_b = losses_b.first == reference.first and not losses_b.mismatches
    rescues = output_b.count("snapshot from shared memory")
    results.append(("(b) `--snapshot_every_step`; trainer killed, supervisor alive", records_b,
                    yes_no(same_b, losses_b, reference), f"{rescues} rescue commits from shared memory"))  # fmt: skip

    # (c) the whole tree killed at once; durable saves every step in the background; the same command run again
    say("section 3 (c): --save_every_steps 1 --async_save, whole tree killed")
    losses_c = Losses()
    killer = Killer(rng, k_range, step_delay)
    records_c, _ = tree_kills(root, "s3c", tool_args(root / "s3c", epochs, step_delay, "--save_every_steps", "1",
                              "--async_save"), kills, killer, losses=losses_c, timeout=timeout)  # fmt: skip
    same_c = losses_c.first == reference.first and not losses_c.mismatches
    saves = [e for e in read_events(root / "s3c") if e.get("event") == "save" and e.get("reason") == "steps"]
    commit = med([float(e["seconds"]) for e in saves])
    slowest = max((float(e["seconds"]) for e in saves), default=math.nan)
    gap_c = med(killer.gaps)
    results.append(("(c) `--save_every_steps 1 --async_save`; whole tree killed (killpg), same command rerun",
                    records_c, yes_no(same_c, losses_c, reference),
                    f"one commit ({commit * 1e3:.0f} ms, median of {len(saves)}; max {slowest * 1e3:.0f} ms) + the "
                    f"step in flight ({gap_c * 1e3:.0f} ms): <= 1 + ceil(commit / step) = "
                    f"{1 + math.ceil(commit / gap_c)} steps (with the slowest commit: "
                    f"{1 + math.ceil(slowest / gap_c)})"))  # fmt: skip

    print(f"## 3. Steps replayed after a SIGKILL at a random instant (`telepathy.test_preemption`, {total} steps, "
          f"`--step_delay {step_delay}`; killed a uniform fraction of a step after step k's line arrived, k drawn "
          f"{k_range[0]}..{k_range[1]} steps after each resume)\n")  # fmt: skip
    print("| SIGKILL at a random instant | kills | steps replayed, median | max | bit-identical to an uninterrupted "
          "run | kill to restarted trainer, s | loss bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, records, same, note in results:
        replayed = [r.printed - r.resumed for r in records]
        downtime = [r.resumed_after for r in records if r.resumed_after is not None]
        print(f"| {label} | {len(records)} | {med(replayed):g} | {max(replayed, default=math.nan):g} | {same} | "
              f"{med(downtime):.2f} | {note} |")  # fmt: skip
    for label, records, _, _ in results:
        print(f"\n{label.split(' ')[0]} replayed per kill: " + " ".join(str(r.printed - r.resumed) for r in records))
    print("\nReplayed = last step the killed trainer printed - the global step its successor resumed at; a step "
          "line is printed before that step's boundary (snapshot, save), so a kill after the line and before the "
          "boundary replays that step.\n")  # fmt: skip


def yes_no(same: bool, losses: Losses, reference: Losses) -> str:
    if same:
        return f"yes ({len(reference.first)} steps, replays included)"
    missing = len(set(reference.first) - set(losses.first))
    differ = sum(1 for s, v in losses.first.items() if reference.first.get(s) != v)
    return f"NO: {differ} steps differ, {missing} missing, {len(losses.mismatches)} replays differ"


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="an existing directory to write in (default: /tmp)")
    parser.add_argument("--smoke", action="store_true",
                        help="every section at a tiny size (one run per variant, a 1.5 MiB state, 3 kills per case): "
                        "checks that the script runs; the numbers mean little")  # fmt: skip
    parser.add_argument("--sections", default="1,2,3", help="which sections to run, comma-separated (default 1,2,3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill instants")
    parser.add_argument("--main_job_threads", type=int, default=1,
                        help="--threads of the main job in section 1 (default 1; the job's own default is 2, which "
                        "a busy 2-core machine turns into 10x swings between runs)")  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in section 2 (default 1, for the same reason as --main_job_threads)",
    )
    args = parser.parse_args()
    base = usable_dir(args.dir, "hard_kill_bench")
    try:
        sections = {int(s) for s in args.sections.split(",")}
    except ValueError:
        sections = set()
    if not sections or not sections <= {1, 2, 3}:
        parser.error(f"--sections takes numbers from 1,2,3, got {args.sections!r}")
    root = Path(tempfile.mkdtemp(prefix="telepathy-hard-kill-", dir=base))
    started = time.monotonic()
    try:
        if args.smoke:
            print("# --smoke: tiny sizes, so that the script cannot rot; the numbers mean little\n")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        print(f"Measured in {base or tempfile.gettempdir()} on {os.cpu_count()} CPU(s); load average at the start "
              f"{load:.2f}.\n", flush=True)  # fmt: skip
        if 1 in sections:
            section1(root, args.smoke, args.main_job_threads)
            sys.stdout.flush()
        if 2 in sections:
            section2(root, args.smoke, args.threads)
            sys.stdout.flush()
        if 3 in sections:
            section3(root, args.smoke, args.seed)
    finally:
        for tree in list(Tree.live):
            if tree.kill_all():
                tree.proc.wait()
                remove_leaked_slot_dirs(tree.proc.pid)
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    print(f"Wall time {time.monotonic() - started:.0f} s; load average at the end (1, 5, 15 min): "
          f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} CPU(s).")  # fmt: skip
    say(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
