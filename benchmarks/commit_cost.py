"""The fixed cost of one commit: a small state (~2 MiB: an MLP and its Adam moments) saved with
``Checkpointer.save`` (synchronous, durable), timed save by save with a breakdown by step of the commit protocol.

    python benchmarks/commit_cost.py                      # 50 measured saves on /tmp
    python benchmarks/commit_cost.py --dir /scratch/bench # the disk a run would use
    python benchmarks/commit_cost.py --smoke              # 5 saves (a test runs this)

At this size the bytes hardly matter: what is left is the protocol (a temporary directory, an fsync per file,
the manifest, the commit rename and the fsyncs that make it durable, the ``latest`` symlink, pruning with the
default retention). Each measured save prunes one checkpoint (three warm-up saves come first). Side by side, in
the same loop: ``torch.save`` of the same state to one file, without and with an fsync.

How: this process records, during each save, ``os.fsync`` (with the path of the fd: files and directories apart),
``os.rename`` and ``os.replace``, and when ``CheckpointStore.save`` starts and returns. The save is cut into
consecutive steps at points that the on-disk layout defines: the fsync of ``manifest.json``, the directory fsync
after the rename to ``checkpoints/step_N``, the one after ``latest`` is replaced. So the breakdown follows the
commit protocol, not the module layout of the code; if a save no longer shows one of these points, the script
stops with a message (the protocol changed and this script must follow).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import usable_dir

ROWS = [  # the steps of one save, in order; each from the end of the previous one
    ("outside", "Checkpointer.save outside the store: state_dict, RNG capture, events.jsonl"),
    ("parts", "temporary directory, parts: torch.save + hash + fsync, each file"),
    ("manifest", "manifest.json: build, write, fsync"),
    ("publish", "publish: fsync the directory, rename to step_N, fsync checkpoints/"),
    ("symlink", "latest symlink: replace, fsync the save dir"),
    ("after", "prune: retention, rename aside, fsync, delete (and the rest of the save)"),
]


class ProtocolChanged(RuntimeError):
    pass


class Recorder:
    """While ``active``: ``os.fsync``/``rename``/``replace`` and the store's save, as timestamped events."""

    def __init__(self) -> None:
        self.active = False
        self.events: list[tuple[str, float, dict[str, Any]]] = []  # (kind, time at the end, details)
        self._undo: list[tuple[Any, str, Any]] = []

    def _patch(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        real = getattr(owner, attr)
        self._undo.append((owner, attr, real))
        setattr(owner, attr, make(real))

    def __enter__(self) -> Recorder:
        def fsync(real: Callable[[int], None]) -> Callable[[int], None]:
            def wrapper(fd: int) -> None:
                if not self.active:
                    return real(fd)
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    path = ""
                started = time.perf_counter()
                real(fd)
                now = time.perf_counter()
                self.events.append(("fsync", now, {"path": path, "dir": is_dir, "seconds": now - started}))

            return wrapper

        def move(kind: str) -> Callable[[Any], Any]:
            def make(real: Callable[..., None]) -> Callable[..., None]:
                def wrapper(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
                    real(src, dst, *args, **kwargs)
                    if self.active:
                        self.events.append((kind, time.perf_counter(), {"src": os.fspath(src), "dst": os.fspath(dst)}))

                return wrapper

            return make

        self._patch(os, "fsync", fsync)
        self._patch(os, "rename", move("rename"))
        self._patch(os, "replace", move("replace"))
        return self

    def watch_store(self, store: Any) -> None:
        """Mark the start and end of ``store.save`` (this instance only)."""

        def make(real: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.events.append(("store_start", time.perf_counter(), {}))
                try:
                    return real(*args, **kwargs)
                finally:
                    self.events.append(("store_end", time.perf_counter(), {}))

            return wrapper

        self._patch(store, "save", make)

    def __exit__(self, *exc: object) -> None:
        for owner, attr, real in reversed(self._undo):
            setattr(owner, attr, real)
        self._undo.clear()


def breakdown(events: list[tuple[str, float, dict[str, Any]]], whole: float) -> dict[str, float]:
    """Seconds per row of ``ROWS`` and fsync counts/seconds (``fsyncs <row>``, ``fsync s <row>``, ``file fsyncs``
    ...) for one save's events."""

    def first(kind: str, after: float, test: Callable[[dict[str, Any]], bool], what: str) -> float:
        for k, t, details in events:
            if k == kind and t >= after and test(details):
                return t
        raise ProtocolChanged(f"a save showed no {what}: the commit protocol changed; update benchmarks/commit_cost.py")

    start = first("store_start", -math.inf, lambda d: True, "call of CheckpointStore.save")
    end = first("store_end", start, lambda d: True, "return from CheckpointStore.save")
    manifest = first("fsync", start, lambda d: not d["dir"] and Path(d["path"]).name == "manifest.json",
                     "fsync of manifest.json")  # fmt: skip
    parts = max([t for k, t, d in events if k == "fsync" and not d["dir"] and start <= t < manifest], default=start)
    renamed = first("rename", manifest, lambda d: Path(d["dst"]).parent.name == "checkpoints"
                    and Path(d["dst"]).name.startswith("step_"), "rename to checkpoints/step_N")  # fmt: skip
    published = first("fsync", renamed, lambda d: d["dir"], "directory fsync after the commit rename")
    linked = first("replace", published, lambda d: Path(d["dst"]).name == "latest", "replace of latest")
    linked = first("fsync", linked, lambda d: d["dir"], "directory fsync after latest was replaced")
    bounds = [start, parts, manifest, published, linked, end]
    out = {"outside": whole - (end - start)}
    for (key, _), lo, hi in zip(ROWS[1:], bounds, bounds[1:]):
        out[key] = hi - lo
    for k, t, d in events:
        if k != "fsync":
            continue
        row = next((key for (key, _), lo, hi in zip(ROWS[1:], bounds, bounds[1:]) if lo <= t <= hi), "outside")
        out[f"fsyncs {row}"] = out.get(f"fsyncs {row}", 0) + 1
        out[f"fsync s {row}"] = out.get(f"fsync s {row}", 0.0) + d["seconds"]
        kind = "directory" if d["dir"] else "file"
        out[f"{kind} fsyncs"] = out.get(f"{kind} fsyncs", 0) + 1
        out[f"{kind} fsync s"] = out.get(f"{kind} fsync s", 0.0) + d["seconds"]
    return out


def make_training_state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP of ~170k parameters and Adam after one step: 0.66 MiB of weights + 1.3 MiB of moments."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.ReLU(), torch.nn.Linear(384, 192))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(32, 256)
    model(x).pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_save(obj: Any, path: Path, fsync: bool) -> float:
    started = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(obj, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    took = time.perf_counter() - started
    path.unlink()
    return took


def measure(root: Path, saves: int, warmup: int) -> tuple[list[dict[str, float]], dict[str, list[float]], int]:
    """Per measured save: its breakdown (and ``whole``); the torch.save baselines from the same loop."""
    from telepathy.checkpointer import Checkpointer
    from telepathy.train_state import TrainState

    model, optimizer = make_training_state()
    size = state_bytes(model, optimizer)
    baselines: dict[str, list[float]] = {"torch.save, one file": [], "torch.save + fsync, one file": []}
    rows: list[dict[str, float]] = []
    scratch = root / "torch_save.pt"
    with Recorder() as recorder, Checkpointer(root / "run", parts={"model": model}, optimizer=optimizer) as ckpt:
        recorder.watch_store(ckpt.store)
        for step in range(1, warmup + saves + 1):
            whole_state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            no_fsync = torch_save(whole_state, scratch, fsync=False)
            with_fsync = torch_save(whole_state, scratch, fsync=True)
            recorder.events.clear()
            recorder.active = True
            started = time.perf_counter()
            ckpt.save(TrainState(global_step=step), "bench")
            whole = time.perf_counter() - started
            recorder.active = False
            row = breakdown(recorder.events, whole)  # every save, warm-up too: a changed protocol stops us early
            if step > warmup:
                rows.append({**row, "whole": whole})
                baselines["torch.save, one file"].append(no_fsync)
                baselines["torch.save + fsync, one file"].append(with_fsync)
    return rows, baselines, size


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=None, help="measured saves; medians are shown (default 50)")
    parser.add_argument("--dir", type=Path, default=None, help="an existing directory to write in (default: /tmp)")
    parser.add_argument("--smoke", action="store_true", help="5 measured saves: checks the script runs")
    args = parser.parse_args()
    saves = args.saves or (5 if args.smoke else 50)
    base = usable_dir(args.dir, "commit_cost")
    root = Path(tempfile.mkdtemp(prefix="telepathy-commit-cost-", dir=base))
    try:
        rows, baselines, size = measure(root, saves, warmup=3)
    except ProtocolChanged as exc:
        print(f"commit_cost: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0) for r in rows)

    whole = med("whole")
    if args.smoke:
        print("# --smoke: 5 saves, so that the script cannot rot; the numbers mean little\n")
    print(f"## commit cost: {size / 2**20:.2f} MiB state (MLP + Adam), {saves} saves after 3 warm-up, in "
          f"{base or tempfile.gettempdir()}; medians")  # fmt: skip
    print("| step of Checkpointer.save (sync) | ms | share of save | fsyncs | fsync ms |")
    print("|---|---|---|---|---|")
    for key, label in ROWS:
        seconds = med(key)
        print(f"| {label} | {ms(seconds)} | {seconds / whole:.0%} | {med(f'fsyncs {key}'):g} | "
              f"{ms(med(f'fsync s {key}'))} |")  # fmt: skip
    fsyncs = statistics.median(r.get("file fsyncs", 0) + r.get("directory fsyncs", 0) for r in rows)
    fsync_s = statistics.median(r.get("file fsync s", 0) + r.get("directory fsync s", 0) for r in rows)
    print(f"| **whole save** | **{ms(whole)}** | 100% | {fsyncs:g} | {ms(fsync_s)} |")
    print(f"\nfsync per save: {med('file fsyncs'):g} files ({ms(med('file fsync s'))} ms), "
          f"{med('directory fsyncs'):g} directories ({ms(med('directory fsync s'))} ms): {fsync_s / whole:.0%} of "
          "the save. Each row is its own median, so the rows need not add up to the whole exactly.")  # fmt: skip
    print("\n| same state, same loop | ms | whole save / this |\n|---|---|---|")
    for label, values in baselines.items():
        print(f"| {label} | {ms(statistics.median(values))} | {whole / statistics.median(values):.1f} |")
    print(f"| Checkpointer.save (sync: durable and committed on return) | {ms(whole)} | 1.0 |")


if __name__ == "__main__":
    main()
