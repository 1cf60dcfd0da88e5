"""``SAVE_DIR/events.jsonl``: one JSON object per line, flushed as it happens, so ``tail -f`` shows a run's
life (start, resume, save, preempt, restart, exit). A supervised trainer also sends each event to its
supervisor over a pipe (fd in ``TELEPATHY_REPORT_FD``): commits are reported without parsing log text."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from typing import Any

from telepathy.disk.save_dir import EVENTS as EVENTS_FILE  # noqa: F401 (re-exported)
from telepathy.disk.save_dir import SaveDir
from telepathy.training_signals import report_fd

log = logging.getLogger("telepathy")
PROGRESS_EVERY_ENV = "TELEPATHY_PROGRESS_EVERY"  # seconds between progress records [2]


class EventLog:
    def __init__(self, save_dir: str | os.PathLike, source: str) -> None:
        self.path = SaveDir(save_dir).events
        self.source = source
        self.failed = False  # an append failed (warned once)
        self.report_fd = report_fd()  # (only a real pipe: the number may name another file in a launcher's worker)

    def emit(self, kind: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": kind, "source": self.source, "pid": os.getpid(), **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = (
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            )  # a FIFO: no wait
            fd = os.open(self.path, flags, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(f"{self.path} is not a regular file")
            try:
                os.write(fd, line)  # one write per line with O_APPEND: lines from two processes never interleave
            finally:
                os.close(fd)
        except OSError as exc:  # best effort: a full disk or a hostile link never stops training
            if not self.failed:
                log.warning("could not append to %s (%s); training goes on without the event log", self.path, exc)
            self.failed = True
        if self.report_fd is not None:
            try:
                os.write(self.report_fd, line)
            except OSError:
                self.report_fd = None  # the supervisor is gone; the file still has everything


def read_events(save_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``events.jsonl``; a torn, binary or foreign line is skipped (the log is best effort)."""
    path = SaveDir(save_dir).events
    try:
        if path.is_symlink() or not path.is_file():
            return []
        with open(path, "rb") as f:  # the last 64 MiB at most: a run's recent life, never all of a huge file
            f.seek(max(0, path.stat().st_size - (64 << 20)))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str) and _number(record.get("time")):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


class RunRecorder:
    """What a :class:`~telepathy.checkpointer.Checkpointer` records about its run, for ``python -m telepathy
    status`` and ``plot``: start/resume, progress (at most every ``every`` seconds: step, epoch, the mean of the
    metric passed to ``step_boundary`` since the last record, steps/s), save, save_failed and preempt."""

    def __init__(self, save_dir: str | os.PathLike, every: float | None = None) -> None:
        self.log = EventLog(save_dir, "trainer")
        self.every = float(os.environ.get(PROGRESS_EVERY_ENV, "2")) if every is None else every
        self.started = False
        self._last = time.monotonic()
        self._steps = 0
        self._metrics: list[float] = []

    def start(self, step: int, epoch: int, resumed_from: str | None = None) -> None:
        self.started = True
        self._last, self._steps, self._metrics = time.monotonic(), 0, []
        if resumed_from is None:
            self.log.emit("start", step=step, epoch=epoch)
        else:
            self.log.emit("resume", step=step, epoch=epoch, path=resumed_from)

    def step(self, step: int, epoch: int, metric: float | None) -> None:
        if not self.started:
            self.start(step - 1, epoch)
        self._steps += 1
        if metric is not None and math.isfinite(metric):
            self._metrics.append(metric)
        elapsed = time.monotonic() - self._last
        if elapsed >= self.every:
            mean = sum(self._metrics) / len(self._metrics) if self._metrics else None
            self.log.emit("progress", step=step, epoch=epoch, metric=mean, steps_per_s=round(self._steps / elapsed, 3))
            self._last, self._steps, self._metrics = time.monotonic(), 0, []

    def emit(self, kind: str, **fields: Any) -> None:
        self.log.emit(kind, **fields)
