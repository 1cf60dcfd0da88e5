"""Checkpointing from a GPU, measured side by side in one run. Needs a CUDA GPU; without one it says so in one line,
prints its table headers with "no GPU" rows and exits 0.

    python benchmarks/gpu_bench.py                       # a 1 GiB state, 3 repeats (sized for gpu_check.sh's 140 s)
    python benchmarks/gpu_bench.py --state_mib 4096 --dir /scratch/bench
    python benchmarks/gpu_bench.py --smoke               # tiny sizes, so that the script cannot rot (a test runs it)

1. Snapshot stall vs the device-to-host copy floor, for a state of fp32 CUDA tensors (64 MiB each): the floor is
   ``copy_(non_blocking=True)`` of every tensor into preallocated pinned host buffers and one synchronisation,
   measured in the same run; beside it the same copy into pageable buffers, a per-step snapshot into shared memory
   (``StepSnapshots.capture``: what ``--snapshot_every_step`` pays), telepathy's async save (blocking: the copy into
   its pinned buffers; durable: until committed), its sync save, and DCP ``save`` / ``async_save`` (in a one-rank
   gloo process group, made last and destroyed). Medians of ``--repeats``; GB/s over the blocking time.
2. Loop overhead on the GPU: an MLP of ``--loop_mib`` MiB of weights trained with AdamW (3x that in state), 20 steps,
   ms/step with no protection, interval saves every 20 steps (sync, async), per-step protection
   (``snapshot_every_step``, slots in /dev/shm when it has room, else in ``--dir``) and ``every_steps=1`` with
   ``async_save`` (latest wins); each variant in blocks of steps, alternated over two rounds, medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import usable_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's telepathy, installed or not

SNAPSHOT_HEADER = "| snapshot of the state (GPU to host) | blocking ms | GB/s | x pinned copy floor | durable s |"
LOOP_HEADER = "| training loop on the GPU | ms/step | x no protection | in step_boundary ms/step | saves committed |"
NO_GPU_ROW = "| no GPU | - | - | - | - |"


class Holder:
    """A part whose state dict is the given tensors."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def slot_directory(root: Path, need: int) -> Path:
    """Shared memory when /dev/shm has room for both slots (a container's is often 64 MiB), else ``root``."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 3 * need else root
    from telepathy.disk import slots

    return slots.make_slot_dir(base)  # (with the marker a trainer checks before it writes there)


# ------------------------------------------------------------------------------------------------------- section 1
def snapshot_section(root: Path, mib: int, repeats: int) -> None:
    from telepathy import Checkpointer, TrainState
    from telepathy.store.step_snapshots import StepSnapshots

    per_tensor = min(mib, 64) * 2**20 // 4
    state = {f"t{i}": torch.randn(per_tensor, device="cuda") for i in range(max(1, mib // 64))}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pinned = [torch.empty_like(t, device="cpu").pin_memory() for t in state.values()]
    pageable = [torch.empty_like(t, device="cpu") for t in state.values()]

    def copy_into(buffers: list[torch.Tensor], non_blocking: bool) -> None:
        for b, t in zip(buffers, state.values()):
            b.copy_(t, non_blocking=non_blocking)
        torch.cuda.synchronize()

    rows: dict[str, list[tuple[float, float]]] = {}

    def add(label: str, blocking: float, durable: float = float("nan")) -> None:
        rows.setdefault(label, []).append((blocking, durable))

    slot_dir = slot_directory(root, nbytes)
    snapshots = StepSnapshots(slot_dir)
    try:
        for r in range(repeats + 1):  # the first round warms up (buffers, slot files, page cache); not recorded
            keep = add if r else (lambda *a: None)
            keep("pinned copy floor (non_blocking copy_, one synchronize)", timed(lambda: copy_into(pinned, True)))
            keep("pageable copy (copy_ into pageable buffers)", timed(lambda: copy_into(pageable, False)))
            keep("per-step snapshot into shared memory (`--snapshot_every_step`)",
                 timed(lambda r=r: snapshots.capture(r, {"model": state}, {}, {})))  # fmt: skip
            with Checkpointer(root / f"async-{r}", parts={"model": Holder(state)}, async_save=True) as ckpt:
                ckpt.save(TrainState(global_step=1), "warm", blocking=False)
                ckpt.wait()
                started = time.perf_counter()
                blocking = timed(lambda ckpt=ckpt: ckpt.save(TrainState(global_step=2), "interval", blocking=False))
                ckpt.wait()
                keep("telepathy async save (pinned staging)", blocking, time.perf_counter() - started)
            with Checkpointer(root / f"sync-{r}", parts={"model": Holder(state)}) as ckpt:
                took = timed(lambda ckpt=ckpt: ckpt.save(TrainState(global_step=1), "interval"))
                keep("telepathy sync save", took, took)
            for label, (blocking, durable) in dcp_saves(root, state, r).items():
                keep(label, blocking, durable)
            shutil.rmtree(root / f"async-{r}", ignore_errors=True)
            shutil.rmtree(root / f"sync-{r}", ignore_errors=True)
    finally:
        snapshots.close()
        shutil.rmtree(slot_dir, ignore_errors=True)
    floor = med([b for b, _ in rows["pinned copy floor (non_blocking copy_, one synchronize)"]])
    print(f"## 1. Snapshot of a {nbytes / 2**20:.0f} MiB state on {torch.cuda.get_device_name()} "
          f"({len(state)} fp32 tensors), {repeats} repeat(s), medians; slots in {slot_dir.parent}\n")  # fmt: skip
    print(SNAPSHOT_HEADER)
    print("|---|---|---|---|---|")
    for label, values in rows.items():
        if any(isinstance(b, str) for b, _ in values):
            print(f"| {label} | {values[-1][0]} | | | |")
            continue
        blocking, durable = med([b for b, _ in values]), med([d for _, d in values])
        print(f"| {label} | {blocking * 1e3:.1f} | {nbytes / blocking / 1e9:.2f} | {blocking / floor:.2f} | "
              f"{'' if durable != durable else f'{durable:.3f}'} |")  # fmt: skip
    print()


def dcp_saves(root: Path, state: dict[str, torch.Tensor], r: int) -> dict[str, tuple[Any, Any]]:
    """DCP save and async_save in a one-rank gloo process group, destroyed before returning (while it lives,
    telepathy's Checkpointer would count as distributed)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rendezvous = Path(tempfile.mkdtemp(prefix="pg-", dir=root)) / "store"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    out: dict[str, tuple[Any, Any]] = {}
    try:
        took = timed(lambda: dcp.save(state, checkpoint_id=root / f"dcp-{r}"))
        out["DCP save"] = (took, took)
        started = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=root / f"dcp-async-{r}")
        blocking = time.perf_counter() - started
        future.result()
        out["DCP async_save"] = (blocking, time.perf_counter() - started)
    except (Exception, dcp.api.CheckpointException) as exc:  # (not an Exception) say so in the table, go on
        out["DCP save / async_save"] = (f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:80]}", 0.0)
    finally:
        dist.destroy_process_group()
        for name in (rendezvous.parent, root / f"dcp-{r}", root / f"dcp-async-{r}"):
            shutil.rmtree(name, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------------- section 2
def loop_section(root: Path, mib: int, steps: int, rounds: int) -> None:
    from torch import nn

    from telepathy import Checkpointer, TrainState
    from telepathy.disk import slots

    width = 4096 if mib >= 64 else 256
    depth = max(1, mib * 2**20 // (width * width * 4))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(width, width, device="cuda")

    def step() -> None:
        loss = model(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    slot_dir = slot_directory(root, state_bytes)
    os.environ[slots.SLOT_DIR_ENV] = str(slot_dir)  # read when a Checkpointer is constructed
    parts = {"model": model}
    variants = {
        "no protection (interval 600 s)": dict(interval=600),
        "interval saves every 20 steps, sync": dict(interval=None, every_steps=20),
        "interval saves every 20 steps, async": dict(interval=None, every_steps=20, async_save=True),
        "per-step protection (`snapshot_every_step`)": dict(interval=None, snapshot_every_step=True),
        "`every_steps=1, async_save` (latest wins)": dict(interval=None, every_steps=1, async_save=True),
    }
    ckpts, commits = {}, {name: 0 for name in variants}
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    inside: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for i, (name, options) in enumerate(variants.items()):
            ckpts[name] = Checkpointer(root / f"loop-{i}", parts=parts, optimizer=optimizer, keep_last=1, **options)
            ckpts[name].on_save = lambda report, name=name: commits.__setitem__(name, commits[name] + 1)
        states = {name: TrainState() for name in variants}
        for r in range(rounds + 1):  # round 0 warms up every variant (buffers, slots) and is not recorded
            if r == 1:
                commits.update(dict.fromkeys(commits, 0))
            for name in list(variants) if r % 2 else list(variants)[::-1]:
                ckpt, state, boundary = ckpts[name], states[name], 0.0
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(steps if r else 3):
                    step()
                    state.advance(batches_per_epoch=10**9)
                    b0 = time.perf_counter()
                    ckpt.step_boundary(state)
                    boundary += time.perf_counter() - b0
                torch.cuda.synchronize()
                if r:
                    per_step[name].append((time.perf_counter() - started) / steps)
                    inside[name].append(boundary / steps)
                ckpt.wait()  # untimed: the next block starts without a commit in flight
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
        os.environ.pop(slots.SLOT_DIR_ENV, None)
        slots.remove_slot_dir(slot_dir)
    base = med(per_step["no protection (interval 600 s)"])
    print(f"## 2. Loop overhead: {depth} x Linear({width}, {width}) with AdamW on the GPU ({state_bytes / 2**20:.0f} "
          f"MiB of state), {rounds} round(s) of {steps} steps per variant, alternated; medians\n")  # fmt: skip
    print(LOOP_HEADER)
    print("|---|---|---|---|---|")
    for name in variants:
        ms = med(per_step[name])
        print(f"| {name} | {ms * 1e3:.1f} | {ms / base:.3f} | {med(inside[name]) * 1e3:.2f} | {commits[name]} |")
    print()


def no_gpu() -> None:
    print("no GPU: torch.cuda.is_available() is False, nothing measured (run scripts/gpu_check.sh where there is one)")
    for header in (SNAPSHOT_HEADER, LOOP_HEADER):
        print(f"\n{header}\n|---|---|---|---|---|\n{NO_GPU_ROW}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="an existing directory to write in (default: /tmp)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--state_mib", type=int, default=1024, help="section 1: the state's size (default 1024)")
    parser.add_argument("--loop_mib", type=int, default=128, help="section 2: MiB of weights (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="section 1: repeats, medians shown (default 3)")
    args = parser.parse_args()
    base = usable_dir(args.dir, "gpu_bench")
    if not torch.cuda.is_available():
        no_gpu()
        return
    if args.smoke:
        print("# --smoke: tiny sizes, so that the script cannot rot; the numbers mean little\n")
    from telepathy import training_signals

    root = Path(tempfile.mkdtemp(prefix="telepathy-gpu-bench-", dir=base))
    started = time.monotonic()
    training_signals.install_signal_handlers()  # (a Checkpointer would, and say so); removed again below
    try:
        snapshot_section(root, 4 if args.smoke else args.state_mib, 1 if args.smoke else args.repeats)
        sys.stdout.flush()  # a time limit that stops the script keeps the tables printed so far
        loop_section(root, 4 if args.smoke else args.loop_mib, 3 if args.smoke else 20, 1 if args.smoke else 2)
        sys.stdout.flush()
    finally:
        training_signals.uninstall_signal_handlers()  # Ctrl+C interrupts again
        shutil.rmtree(root, ignore_errors=True)
    print(f"Wall time {time.monotonic() - started:.0f} s; torch {torch.__version__}, CUDA {torch.version.cuda}.")


if __name__ == "__main__":
    main()
