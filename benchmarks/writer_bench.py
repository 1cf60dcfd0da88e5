"""What a background checkpoint writer costs the training loop: a thread (telepathy's ``async_save``) against a
separate process (what DCP moved to, so that the writer never holds the loop's GIL), side by side in one run.

    python benchmarks/writer_bench.py                 # about 2-3 minutes on 2 cores
    python benchmarks/writer_bench.py --every 10 --dir /scratch/bench
    python benchmarks/writer_bench.py --smoke         # a tiny size (a test runs this)

The loop: an nn.Linear stack + AdamW (~100 MiB of state with the moments), a batch sized for a ~40 ms step, one
torch thread (the second core is the writer's). Variants, in blocks of steps alternated A B C C B A ...:
- **no saves**;
- **thread**: every ``--every`` steps the state is copied into reusable host buffers and a thread commits it with
  ``CheckpointStore.save`` (serialise, hash, write, fsync, rename, manifest) — what ``async_save`` does;
- **process**: every ``--every`` steps the state is copied into shared-memory buffers and a writer process (started
  once) commits the same files with the same ``CheckpointStore.save``.
A save that comes due while the previous one is in flight is skipped in both (latest wins). Reported per variant:
ms/step, the overhead over no saves of the same round (median over rounds), the loop's time blocked per save (the
copy), how many saves committed, and the GIL's share: a sampling thread in the loop's process asks for the GIL
every 1 ms and records how late it got it while a save was in flight.
"""

from __future__ import annotations

import argparse
import functools
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import adamw_step, batch_for_step_ms, usable_dir
from torch import nn


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def writer_process(conn: Any, save_dir: str, shared: dict[str, torch.Tensor]) -> None:
    """The process variant's writer: commits ``shared`` (tensors in shared memory) at each step it is sent."""
    from telepathy.store.checkpoint_store import CheckpointStore

    torch.set_num_threads(1)
    store = CheckpointStore(save_dir)
    store.prepare()
    try:
        while (step := conn.recv()) is not None:
            started = time.perf_counter()
            store.save(step, {"model": shared}, {"reason": "interval"})
            conn.send(time.perf_counter() - started)
    finally:
        store.close()


class GilProbe:
    """A thread that sleeps 1 ms at a time and records how late it wakes while ``saving()`` says a save is in
    flight (it needs the GIL to wake: while a writer thread holds the GIL, the training loop cannot run Python
    either)."""

    def __init__(self, saving: Any) -> None:
        self.late: list[float] = []
        self.saving = saving
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = time.perf_counter()
            time.sleep(0.001)
            if self.saving():
                self.late.append(time.perf_counter() - asked - 0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=5, help="steps between saves (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="an existing directory to write in (default: /tmp)")
    parser.add_argument("--smoke", action="store_true", help="a tiny size, so that the script cannot rot")
    args = parser.parse_args()
    if args.every < 1:
        parser.error(f"--every must be at least 1, got {args.every}")
    base = usable_dir(args.dir, "writer_bench")
    torch.set_num_threads(1)
    width, depth, rounds, block = (256, 2, 2, 6) if args.smoke else (1024, 8, 6, 30)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    make_step = functools.partial(adamw_step, model, optimizer, width=width)
    batch = 16 if args.smoke else batch_for_step_ms(make_step, target_ms=40.0, tries=7)
    step = make_step(batch)
    step()  # the AdamW moments exist from here on

    def state() -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in model.state_dict().items()}
        for i, s in enumerate(optimizer.state.values()):
            out.update({f"adam.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
        return out

    live = state()
    nbytes = sum(t.numel() * t.element_size() for t in live.values())
    host = {k: torch.empty_like(v) for k, v in live.items()}
    shared = {k: torch.empty_like(v).share_memory_() for k, v in live.items()}
    root = Path(tempfile.mkdtemp(prefix="writer-bench-", dir=base))
    context = torch.multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    writer = context.Process(target=writer_process, args=(theirs, str(root / "process"), shared), daemon=True)
    writer.start()
    from telepathy.store.checkpoint_store import CheckpointStore

    store = CheckpointStore(root / "thread")
    store.prepare()
    results: dict[str, dict[str, list[float]]] = {
        name: {"step": [], "blocked": [], "commits": [], "late": []} for name in ("none", "thread", "process")
    }
    in_flight: dict[str, Any] = {"thread": None, "process": False}
    step_no = [0]
    thread_saving = lambda: in_flight["thread"] is not None and in_flight["thread"].is_alive()  # noqa: E731
    probe = GilProbe(lambda: thread_saving() or in_flight["process"])

    def busy(name: str) -> bool:
        if name == "thread":
            return thread_saving()
        if in_flight["process"] and ours.poll():
            results["process"]["commits"].append(ours.recv())
            in_flight["process"] = False
        return bool(in_flight["process"])

    def start_save(name: str) -> None:
        started = time.perf_counter()
        if name == "thread":
            for k, v in live.items():
                host[k].copy_(v)
            n = step_no[0]

            def commit() -> None:
                began = time.perf_counter()
                store.save(n, {"model": host}, {"reason": "interval"})
                results["thread"]["commits"].append(time.perf_counter() - began)

            in_flight["thread"] = threading.Thread(target=commit)
            in_flight["thread"].start()
        else:
            for k, v in live.items():
                shared[k].copy_(v)
            ours.send(step_no[0])
            in_flight["process"] = True
        results[name]["blocked"].append(time.perf_counter() - started)

    def finish(name: str) -> None:
        if name == "thread" and in_flight["thread"] is not None:
            in_flight["thread"].join()
            in_flight["thread"] = None
        while name == "process" and busy("process"):
            time.sleep(0.005)

    def run_block(name: str, record: bool) -> None:
        started = time.perf_counter()
        for i in range(block):
            step()
            step_no[0] += 1
            if name != "none" and i % args.every == args.every - 1 and not busy(name):
                start_save(name)
        if record:
            results[name]["step"].append((time.perf_counter() - started) / block)
        finish(name)  # untimed: the next block starts with no save in flight

    try:
        for name in results:  # warm-up: buffers touched, the writer process imported and ready
            run_block(name, record=False)
        for r in range(rounds):
            names = list(results) if r % 2 == 0 else list(results)[::-1]
            for name in names:
                before = len(probe.late)
                run_block(name, record=True)
                results[name]["late"] += probe.late[before:]  # (what finish() waited for included)
    finally:
        probe.stop()
        ours.send(None)
        writer.join(timeout=60)
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    none = results["none"]["step"]
    print(f"## A background writer and the training loop: {nbytes / 2**20:.1f} MiB state, "
          f"{med(none) * 1e3:.0f} ms steps (batch {batch}, 1 torch thread), a save every {args.every} steps; "
          f"{rounds} rounds x {block} steps per variant, alternated; medians\n")  # fmt: skip
    print("| writer | ms/step | x no saves | overhead ms/step | loop blocked per save ms | saves committed "
          "| commit ms | GIL wait while saving, p99 / max ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, label in (("none", "no saves"), ("thread", "thread (async_save)"), ("process", "process")):
        r = results[name]
        over = med([a - b for a, b in zip(r["step"], none)])
        late = sorted(r["late"])
        p99 = late[int(len(late) * 0.99)] * 1e3 if late else math.nan
        print(f"| {label} | {med(r['step']) * 1e3:.2f} | {med(r['step']) / med(none):.3f} | {over * 1e3:+.2f} | "
              f"{med(r['blocked']) * 1e3:.2f} | {len(r['commits'])} | {med(r['commits']) * 1e3:.0f} | "
              f"{p99:.2f} / {max(late, default=math.nan) * 1e3:.2f} |")  # fmt: skip
    print(
        "\nGIL wait: how late a 1 ms sleep in a third thread of the loop's process woke while a save was in "
        "flight (it needs the GIL to wake; the no-saves row has none in flight)."
    )


if __name__ == "__main__":
    sys.exit(main())
