"""What a save dir says about its run, for ``python -m telepathy status`` and ``list``: read from
``events.jsonl`` (written by the Checkpointer and the supervisor) and the checkpoints themselves, never from
log text. Nothing here writes to the save dir."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from telepathy.disk.catalog import Catalog
from telepathy.disk.contents import MANIFEST
from telepathy.disk.lock import describe_holder
from telepathy.disk.manifest import read_manifest
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import CheckpointInvalid
from telepathy.tools.run_events import describe_skipped, run_events

EXIT_MEANING = {0: "complete", 99: "preempted", 98: "preempted (nothing new saved)", 129: "hung up",
                130: "interrupted"}  # fmt: skip


@dataclass
class CheckpointRow:
    path: str
    step: int
    epoch: int | None
    time: float
    bytes: int
    reason: str
    verified: bool | None  # None: not checked
    problem: str | None = None


def list_checkpoints(save_dir: Path, verify: bool = True) -> list[CheckpointRow]:
    """Committed and emergency checkpoints, oldest first."""
    directories = SaveDir(save_dir).all_checkpoints()
    catalog = Catalog(SaveDir(save_dir))
    rows = []
    for directory in directories:
        try:
            manifest = read_manifest(directory)
        except CheckpointInvalid as exc:
            rows.append(CheckpointRow(str(directory), -1, None, directory.stat().st_mtime, 0, "?", False,
                                      f"{exc.file}: {exc.reason}"))  # fmt: skip
            continue
        size = sum(f["bytes"] for f in manifest["files"].values()) + sum(
            b["bytes"] for b in (manifest.get("blobs") or {}).values()
        )
        problem = None
        if verify:
            try:
                catalog.verify(directory)
            except CheckpointInvalid as exc:
                problem = f"{exc.file}: {exc.reason}"
        rows.append(CheckpointRow(str(directory), int(manifest.get("step", -1)), manifest.get("epoch"),
                                  (directory / MANIFEST).stat().st_mtime, size, str(manifest.get("reason")),
                                  problem is None if verify else None, problem))  # fmt: skip
    return sorted(rows, key=lambda r: (r.step, r.time))


def run_status(save_dir: Path) -> dict[str, Any]:
    """The run's state (running/preempted/complete/failed/not started), position, latest checkpoint,
    preemptions, restarts, time lost to preemption, the last exit code and how many event records were left out
    (:mod:`telepathy.tools.run_events`)."""
    events, skipped = run_events(save_dir)
    latest = SaveDir(save_dir).latest_target()
    checkpoint = None
    if latest is not None and latest.is_dir():
        rows = [r for r in list_checkpoints(save_dir, verify=False) if Path(r.path).resolve() == latest]
        if rows:
            row = rows[0]
            checkpoint = {"path": row.path, "step": row.step, "reason": row.reason, "bytes": row.bytes,
                          "age_s": round(time.time() - row.time, 1)}  # fmt: skip
    exits = [e for e in events if e["event"] == "exit"]
    preempts = [e for e in events if e["event"] == "preempt"]
    last_exit = last_exit_code(events)
    positions = [e for e in events if "step" in e and e["event"] in ("progress", "save", "preempt", "resume", "start")]
    last = positions[-1] if positions else {}
    return {
        "save_dir": str(save_dir),
        "state": _state(save_dir, events, last_exit),
        "step": last.get("step", checkpoint and checkpoint["step"]),
        "epoch": next((e["epoch"] for e in reversed(positions) if e.get("epoch") is not None), None),
        "last_event": events[-1]["event"] if events else None,
        "last_event_age_s": round(time.time() - events[-1]["time"], 1) if events else None,
        "latest_checkpoint": checkpoint,
        "checkpoints": len(SaveDir(save_dir).committed()),
        "preemptions": len(preempts) or sum(e["exit_code"] == 99 for e in exits),
        "restarts": sum(e["event"] == "resume" for e in events),
        "time_lost_s": round(time_lost(events), 1),
        "last_exit_code": last_exit,
        "slurm_job": next((e.get("SLURM_JOB_ID") for e in reversed(events) if e.get("SLURM_JOB_ID")), None),
        "skipped_events": skipped,
    }


def _state(save_dir: Path, events: list[dict[str, Any]], last_exit: int | None) -> str:
    if SaveDir(save_dir).live_writer():  # read-only: never takes the lock a starting run needs
        return f"running ({describe_holder(save_dir)})"
    if not events:
        return "not started" if not SaveDir(save_dir).committed() else "unknown (no events.jsonl)"
    if last_exit is None:
        return "failed (ended without an exit record: killed?)"
    if last_exit == 0 and _last_save_reason(events) == "duration":
        return "paused (its --duration ran out; rerun to continue)"
    return EXIT_MEANING.get(last_exit, f"failed (exit code {last_exit})")


def _last_save_reason(events: list[dict[str, Any]]) -> str | None:
    """The reason of the newest save of the last run (since its start or resume)."""
    for e in reversed(events):
        if e["event"] == "save":
            return e.get("reason")
        if e["event"] in ("start", "resume"):
            return None
    return None


def last_exit_code(events: list[dict[str, Any]]) -> int | None:
    """The exit code of the run's last ending (supervisor exit, preempt, or a final or --duration save = 0); None when a
    process started after it and left no ending (killed) or nothing ended yet."""
    for e in reversed(events):
        if e["event"] == "exit":
            return int(e["exit_code"])
        if e["event"] == "preempt":
            return int(e["exit_code"])
        if e["event"] == "save" and e.get("reason") in ("final", "duration"):
            return 0
        if e["event"] in ("start", "resume"):
            return None
    return None


def time_lost(events: list[dict[str, Any]]) -> float:
    """Seconds lost to interruptions: the downtime from the last sign of life before each resume to the resume,
    plus the steps redone after it (from the resumed step back up to the furthest step reached) at the run's
    median speed."""
    rates = [e["steps_per_s"] for e in events if e["event"] == "progress" and e.get("steps_per_s")]
    step_s = 1 / statistics.median(rates) if rates else 0.0
    lost, furthest, last_alive = 0.0, 0, None
    for e in events:
        if e["event"] == "resume":
            if last_alive is not None:
                lost += e["time"] - last_alive
            lost += max(0, furthest - e["step"]) * step_s
            furthest = e["step"]
        elif "step" in e:
            furthest = max(furthest, int(e["step"]))
        if e["event"] != "resume" and e.get("source") == "trainer":
            last_alive = e["time"]
    return lost


def format_status(status: dict[str, Any]) -> str:
    cp = status["latest_checkpoint"]
    lines = [
        f"save dir     {status['save_dir']}",
        f"state        {status['state']}",
        f"position     step {status['step']}, epoch {status['epoch']}" + _last_event(status),
        "latest       "
        + (
            f"{cp['path']} (step {cp['step']}, {cp['reason']}, {cp['bytes'] / 2**20:.1f} MiB, {_ago(cp['age_s'])} old)"
            if cp
            else "none"
        ),  # fmt: skip
        f"checkpoints  {status['checkpoints']} committed",
        f"preemptions  {status['preemptions']}, restarts {status['restarts']}, time lost {_ago(status['time_lost_s'])}",
        f"last exit    {status['last_exit_code'] if status['last_exit_code'] is not None else '-'}",
    ]
    if status["slurm_job"]:
        lines.append(f"slurm job    {status['slurm_job']}")
    if status["skipped_events"]:
        lines.append(f"events       {describe_skipped(status['skipped_events'])}")
    return "\n".join(lines)


def format_status_table(statuses: list[dict[str, Any]]) -> str:
    """One line per run, for an operator watching many jobs (``telepathy status runs/*``)."""
    out = [
        f"{'state':<12} {'step':>8} {'epoch':>5} {'latest age':>10} {'preempt':>7} {'restart':>7} {'exit':>4}  save dir"
    ]
    for st in statuses:
        cp = st["latest_checkpoint"]
        exit_code = st["last_exit_code"] if st["last_exit_code"] is not None else "-"
        out.append(f"{st['state'].split(' (')[0]:<12} {st['step'] if st['step'] is not None else '-':>8} "
                   f"{st['epoch'] if st['epoch'] is not None else '-':>5} {_ago(cp['age_s']) if cp else '-':>10} "
                   f"{st['preemptions']:>7} {st['restarts']:>7} {exit_code:>4}  {st['save_dir']}")  # fmt: skip
    return "\n".join(out)


def format_rows(rows: list[CheckpointRow]) -> str:
    out = [f"{'step':>8}  {'epoch':>5}  {'saved at':19}  {'MiB':>8}  {'reason':16}  verified  path"]
    for r in rows:
        verified = {True: "yes", False: "NO", None: "-"}[r.verified]
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
        problem = f"  ({r.problem})" if r.problem else ""
        out.append(f"{r.step:>8}  {r.epoch if r.epoch is not None else '-':>5}  {saved}  {r.bytes / 2**20:>8.2f}  "
                   f"{r.reason:16}  {verified:8}  {os.path.relpath(r.path)}{problem}")  # fmt: skip
    return "\n".join(out)


def _last_event(status: dict[str, Any]) -> str:
    if not status["last_event"]:
        return ""
    return f" (last event {status['last_event']}, {_ago(status['last_event_age_s'])} ago)"


def rows_as_dicts(rows: list[CheckpointRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"
