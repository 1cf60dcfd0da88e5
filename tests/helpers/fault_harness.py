"""Fault injection for the save path, each faulted run finished and compared with an uninterrupted one.

    python tests/helpers/fault_harness.py kills --count 1000      # SIGKILL at random instants (crash consistency)
    python tests/helpers/fault_harness.py corrupt --rounds 5      # flipped, truncated, zeroed, deleted files

A small training run (24 steps, a checkpoint after every step, so a kill lands in a save most of the time) runs
in a forked child; the parent kills it at a random instant, checks what is on disk, starts the next child (which
resumes) and so on until the run completes; then every step's loss, including replayed steps, and the final
model, optimizer and RNG states must equal the uninterrupted run's. The child records the last save step it
passed (``durable.pause_point`` labels) in shared memory, so the report says where the kills landed.
Prints a JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import deep_equal
from torch import nn

from telepathy import restore
from telepathy.checkpointer import Checkpointer
from telepathy.data import resumable_loader
from telepathy.disk import catalog, durable
from telepathy.disk.manifest import CheckpointInvalid, read_manifest, verify_directory
from telepathy.disk.retention import RetentionPolicy
from telepathy.errors import EXIT_CANNOT_RESUME
from telepathy.store import blobs as blob_store
from telepathy.store import formats
from telepathy.store.checkpoint_store import CheckpointStore

EPOCHS, SAMPLES, BATCH = 3, 64, 8  # 24 steps
PHASE = multiprocessing.Array("c", 96, lock=False)  # the child's last label, read by the parent after a kill


def set_phase(label: str) -> None:
    PHASE.value = label.encode()[:95]


NEGATIVE_CONTROL = {"on": False}  # set by --negative_control: break the protection, expect the harness to see it


def unsafe_publish(tmp_dir: Path, final_dir: Path) -> None:
    """Negative control for kills: files appear in the committed directory one by one (no atomic rename)."""
    os.mkdir(final_dir)
    for name in sorted(os.listdir(tmp_dir)):
        os.rename(Path(tmp_dir) / name, Path(final_dir) / name)
        set_phase("unsafe publish: moving files")
        time.sleep(0.01)
    os.rmdir(tmp_dir)


STORE_MODE = {"differential": False, "compress": False}  # set by --store_mode


def train(save_dir: Path, keep_last: int, strict: bool = False, stop_after: int | None = None) -> int:
    """The faulted program: resume, train with a checkpoint after every step. Runs in a forked child."""
    torch.set_num_threads(1)
    durable.pause_point = set_phase  # record each save step reached (the module calls it by this name)
    if NEGATIVE_CONTROL["on"]:
        durable.publish_directory = unsafe_publish  # kills can now tear a committed checkpoint
        catalog.verify_directory = read_manifest  # loading no longer checks the files' bytes
        formats.check_plausible = lambda *args: None  # nor what they hold
        original = restore.read_checkpoint

        def no_fallback(*args, **kwargs):  # and a file that does not load is a failure, not a fallback
            try:
                return original(*args, **kwargs)
            except CheckpointInvalid as exc:
                raise RuntimeError(f"negative control: {exc}") from exc

        restore.read_checkpoint = no_fallback
    set_phase("resume")
    for seed_rng in (random.seed, np.random.seed, torch.manual_seed):
        seed_rng(0)
    data = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 16), torch.randint(0, 4, (SAMPLES,)))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(save_dir, parts={"model": model}, optimizer=optimizer, signature={"batch_size": BATCH},
                        retention=RetentionPolicy(keep_last=keep_last, keep_best=False), **STORE_MODE)  # fmt: skip
    try:
        return _train_loop(ckpt, data, model, optimizer, save_dir, strict, stop_after)
    finally:
        ckpt.close()  # a program's normal end: background deletions of pruned checkpoints finish


def _train_loop(ckpt, data, model, optimizer, save_dir: Path, strict: bool, stop_after: int | None) -> int:
    try:
        state = ckpt.resume(strict=strict)
    except CheckpointInvalid:
        return EXIT_CANNOT_RESUME
    losses = os.open(save_dir / "losses.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    while state.epoch < EPOCHS:
        for x, y in resumable_loader(data, BATCH, seed=0, epoch=state.epoch, start_batch=state.batch_idx):
            set_phase("training step")
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.advance(SAMPLES // BATCH)
            os.write(losses, f"{state.global_step} {loss.item().hex()}\n".encode())
            set_phase("save started")
            ckpt.save(state, "interval", loss.item())
            if state.global_step == stop_after:
                return 0
    return 0


def warm_up(root: Path) -> None:
    """Import lazily loaded torch modules (the optimizer pulls in torch._dynamo, seconds) once in the parent, so
    each forked child starts in milliseconds and the kill instants spread over its training and saves."""
    model = nn.Linear(2, 2)
    torch.optim.AdamW(model.parameters()).step()
    torch.save(model.state_dict(), root / "warm-up.pt")
    torch.load(root / "warm-up.pt", weights_only=True)


def run_child(save_dir: Path, kill_after: float | None = None, **kwargs) -> tuple[str, int | str]:
    """Fork a child running ``train``; SIGKILL it after ``kill_after`` s. Returns ("killed", phase) or
    ("exited", code)."""
    set_phase("fork")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            logging.basicConfig(filename=save_dir.parent / f"{save_dir.name}.log", level=logging.INFO, force=True)
            code = train(save_dir, **kwargs)
        finally:
            os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed", PHASE.value.decode()
    return "exited", os.WEXITSTATUS(status)


def outcome(save_dir: Path) -> tuple[dict[int, set[str]], dict[str, object]]:
    """Losses seen per step, and the final checkpoint's files (for exact comparison)."""
    seen: dict[int, set[str]] = collections.defaultdict(set)
    for line in (save_dir / "losses.txt").read_text().splitlines():
        step, loss = line.split()
        seen[int(step)].add(loss)
    final = CheckpointStore(save_dir).newest_valid()[0].path
    files = {name: CheckpointStore.load_part(final, name) for name in ("model", "optimizer", "state")}
    return seen, files


def differences(run: Path, reference: tuple) -> list[str]:
    seen, files = outcome(run)
    ref_seen, ref_files = reference
    diffs = [f"step {s}: losses {sorted(v)} vs {sorted(ref_seen.get(s, []))}" for s, v in seen.items()
             if v != ref_seen.get(s)]  # fmt: skip
    diffs += [f"missing step {s}" for s in ref_seen.keys() - seen.keys()]
    return diffs + deep_equal(files, ref_files)


def kills(root: Path, count: int, seed: int) -> dict:
    """Kill campaign: ``count`` SIGKILLs; after each, ``latest`` and every committed checkpoint must verify."""
    rng = random.Random(seed)
    warm_up(root)
    started = time.monotonic()
    assert run_child(root / "reference", keep_last=2) == ("exited", 0)
    duration = time.monotonic() - started
    reference = outcome(root / "reference")
    stats = collections.Counter()
    phases = collections.Counter()
    failures: list[str] = []
    while stats["kills"] < count:
        run = root / f"run{stats['runs']:05d}"
        stats["runs"] += 1
        while True:
            result, detail = run_child(run, kill_after=rng.uniform(0, duration / 3), keep_last=2)
            if result == "exited":
                if detail != 0:
                    stats["resume failures"] += 1
                    failures.append(f"{run}: child exited {detail}")
                break
            stats["kills"] += 1
            phases[detail] += 1
            store = CheckpointStore(run)
            pointer = store.latest_pointer()
            for directory in [r.path for r in store.committed()] + ([pointer] if pointer else []):
                try:
                    verify_directory(directory)
                except CheckpointInvalid as exc:
                    stats["torn selected"] += 1
                    failures.append(f"after a kill in {detail!r}: {exc}")
        diffs = differences(run, reference) if not failures else []
        stats["final mismatches"] += bool(diffs)
        failures += [f"{run}: {d}" for d in diffs[:5]]
        if not failures:
            shutil.rmtree(run)
    return {"kills": stats["kills"], "runs": stats["runs"], "torn selected": stats["torn selected"],
            "resume failures": stats["resume failures"], "final mismatches": stats["final mismatches"],
            "kills by phase": dict(phases.most_common()), "failures": failures[:20],
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


CORRUPTIONS = ("flip a byte", "truncate", "zero-fill", "delete")


def corrupt(path: Path, kind: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if kind == "flip a byte":
        at = rng.randrange(len(data))
        path.write_bytes(data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :])
    elif kind == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "zero-fill":
        path.write_bytes(bytes(len(data)))
    else:
        path.unlink()


def corruptions(root: Path, rounds: int, seed: int, sample: int | None = None) -> dict:
    """Damage one file of one checkpoint (or ``latest``); the damage must be detected, the run must fall back
    to the next valid checkpoint and still finish bit-identical; ``strict`` must refuse instead."""
    rng = random.Random(seed)
    warm_up(root)
    started = time.monotonic()
    assert run_child(root / "reference", keep_last=3) == ("exited", 0)
    reference = outcome(root / "reference")
    base = root / "base"
    assert run_child(base, keep_last=3, stop_after=12) == ("exited", 0)  # checkpoints 10, 11, 12
    (base / "losses.txt").write_text("".join(f"{s} {min(v)}\n" for s, v in sorted(reference[0].items()) if s <= 12))
    names = sorted(p.name for p in CheckpointStore(base).committed()[-1].path.iterdir())
    cases = [(which, name, kind) for which in (-1, -2, -3) for name in names for kind in CORRUPTIONS]
    cases += [("latest", "missing directory", "repoint"), ("latest", "half-deleted directory", "repoint")]
    cases = [c for _ in range(rounds) for c in cases]
    if sample is not None:
        cases = rng.sample(cases, min(sample, len(cases)))
    stats = collections.Counter()
    failures: list[str] = []
    for number, (which, name, kind) in enumerate(cases):
        case = root / f"case{number:04d}"
        shutil.copytree(base, case, symlinks=True)
        store = CheckpointStore(case)
        if which == "latest":
            newest = store.committed()[-1].path
            if name == "missing directory":
                os.unlink(case / "latest")
                os.symlink("checkpoints/step_99999999", case / "latest")
            else:
                for victim in sorted(newest.iterdir())[::2]:
                    victim.unlink()
            damaged = newest if name != "missing directory" else None
        else:
            damaged = store.committed()[which].path
            corrupt(damaged / name, kind, rng)
        newest_before = store.committed()[-1].path
        stats["cases"] += 1
        if damaged is not None:
            stats["damaged"] += 1
            try:
                verify_directory(damaged)
                failures.append(f"{kind} of {name} in {damaged.name}: not detected")
            except CheckpointInvalid:
                stats["detected"] += 1
        if damaged == store.committed()[-1].path:  # the one a resume would pick: strict must refuse it
            before = sorted(str(p) for p in case.rglob("*"))
            refused = run_child(case, keep_last=3, strict=True)
            stats["strict refusals"] += refused == ("exited", EXIT_CANNOT_RESUME)
            stats["strict cases"] += 1
            if sorted(str(p) for p in case.rglob("*")) != before:
                failures.append(f"{case}: strict resume changed files")
        if run_child(case, keep_last=3) != ("exited", 0):
            stats["resume failures"] += 1
            failures.append(f"{case}: resume failed ({which} {name} {kind})")
            continue
        log_text = (root / f"{case.name}.log").read_text()
        if damaged == newest_before and f"skipping checkpoint {damaged}: " not in log_text:
            failures.append(f"{case}: no warning naming the skipped {damaged} and its bad file")
        diffs = differences(case, reference)
        stats["final mismatches"] += bool(diffs)
        failures += [f"{case} ({which} {name} {kind}): {d}" for d in diffs[:3]]
        if not diffs:
            shutil.rmtree(case)
    keys = ("cases", "damaged", "detected", "strict cases", "strict refusals", "resume failures", "final mismatches")
    return {**{k: stats[k] for k in keys}, "failures": failures[:20], "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaign", choices=("kills", "corrupt"))
    parser.add_argument("--count", type=int, default=1000, help="kills")
    parser.add_argument("--rounds", type=int, default=5, help="corruption rounds (each: every file x kind)")
    parser.add_argument("--sample", type=int, default=None, help="corruption cases drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a new temp dir)")
    parser.add_argument("--negative_control", action="store_true",
                        help="no atomic publish, no load-time verification: must report losses")  # fmt: skip
    parser.add_argument("--store_mode", choices=("full", "differential", "compress"), default="full",
                        help="differential/compress: every tensor becomes a shared blob")  # fmt: skip
    args = parser.parse_args(argv)
    NEGATIVE_CONTROL["on"] = args.negative_control
    if args.store_mode != "full":
        STORE_MODE[args.store_mode] = True
        blob_store.MIN_BLOB_BYTES = 1  # the harness model is small: make every tensor a blob
    root = args.dir or Path(tempfile.mkdtemp(prefix=f"telepathy-{args.campaign}-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.campaign == "kills":
        summary = kills(root, args.count, args.seed)
        bad = summary["torn selected"] + summary["resume failures"] + summary["final mismatches"]
    else:
        summary = corruptions(root, args.rounds, args.seed, args.sample)
        bad = summary["damaged"] - summary["detected"] + summary["strict cases"] - summary["strict refusals"]
        bad += summary["resume failures"] + summary["final mismatches"]
    print(json.dumps({"campaign": args.campaign, "dir": str(root), **summary}))
    return 1 if bad or summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
