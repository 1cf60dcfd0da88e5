"""A per-step record of the metric a loop passes to ``step_boundary``, exact to the bit (``float.hex``), written when
``TELEPATHY_STEP_LOG`` names a file: what ``telepathy check-resume`` compares between an uninterrupted run and an
interrupted one. One line per step, appended with one write, so a killed process leaves whole lines."""

from __future__ import annotations

import json
import os
from typing import Any

STEP_LOG_ENV = "TELEPATHY_STEP_LOG"


def record_step(path: str, step: int, metric: Any) -> None:
    value = None if metric is None else float(metric).hex()
    line = json.dumps({"step": int(step), "metric": value, "pid": os.getpid()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_steps(path: str | os.PathLike) -> list[dict[str, Any]]:
    try:
        text = open(path).read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
