"""``SAVE_DIR/events.jsonl``: one JSON object per line, flushed as it happens, so ``tail -f`` shows a run's
life (start, resume, save, preempt, restart, exit). A supervised trainer also sends each event to its
supervisor over a pipe (fd in ``TELEPATHY_REPORT_FD``): commits are reported without parsing log text."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

REPORT_FD_ENV = "TELEPATHY_REPORT_FD"
EVENTS_FILE = "events.jsonl"


class EventLog:
    def __init__(self, save_dir: str | os.PathLike, source: str) -> None:
        self.path = Path(save_dir) / EVENTS_FILE
        self.source = source
        fd = os.environ.get(REPORT_FD_ENV)
        self.report_fd = int(fd) if fd and fd.isdigit() else None

    def emit(self, kind: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": kind, "source": self.source, "pid": os.getpid(), **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per line with O_APPEND: lines from two processes never interleave
        finally:
            os.close(fd)
        if self.report_fd is not None:
            try:
                os.write(self.report_fd, line)
            except OSError:
                self.report_fd = None  # the supervisor is gone; the file still has everything


def read_events(save_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(save_dir) / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
