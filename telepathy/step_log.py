"""A per-step record of the metric a loop passes to ``step_boundary``, exact to the bit (``float.hex``), written when
``TELEPATHY_STEP_LOG`` names a file: what ``telepathy check-resume`` compares between an uninterrupted run and an
interrupted one. One line per step, appended with one write, so a killed process leaves whole lines.

``TELEPATHY_STEP_HOLD=K`` (the checker sets it for a run it interrupts) holds the loop at step K, after its line is
written, until a signal arrives: the interruption lands exactly at the step asked for, however fast the steps."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from telepathy import training_signals

STEP_LOG_ENV = "TELEPATHY_STEP_LOG"
STEP_HOLD_ENV = "TELEPATHY_STEP_HOLD"
HOLD_SECONDS = 120.0  # then the loop goes on (a checker that never signals must not hang the run)
_held = False


def record_step(path: str, step: int, metric: Any) -> None:
    value = None if metric is None else float(metric).hex()
    line = json.dumps({"step": int(step), "metric": value, "pid": os.getpid()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    _hold_if_asked(int(step))


def _hold_if_asked(step: int) -> None:
    global _held
    hold = os.environ.get(STEP_HOLD_ENV, "")
    if _held or not hold.isdigit() or int(hold) != step:
        return
    _held = True
    deadline = time.monotonic() + HOLD_SECONDS
    while (
        not training_signals.should_exit_training()
        and not training_signals.save_requested()
        and (time.monotonic() < deadline)
    ):
        time.sleep(0.005)


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
