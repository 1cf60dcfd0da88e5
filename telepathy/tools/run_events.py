"""The records of ``events.jsonl`` that ``status`` and ``plot`` can rely on.

The event log is best effort and anyone can append to it: :func:`~telepathy.disk.events.read_events` already
skips lines that are not JSON objects with an ``event`` and a ``time``; here a record whose fields have the wrong
type (a step that is a string, an exit without a code, a rate that is not a number, a time in 1970 or the far
future) is left out too and counted, so the readers never trust a field they did not check.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from telepathy.disk.events import read_events

LARGEST_STEP = 2**63 - 1  # what an int64 step counter can hold; beyond it a "step" is not one
CLOCK_SKEW_S = 86_400.0  # a record may come from a node whose clock is ahead, by up to a day


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= LARGEST_STEP  # type(): True is not a step


def _exit_code(value: Any) -> bool:
    return type(value) is int and -(2**31) <= value < 2**31  # negative: killed by a signal


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


FIELDS = {  # the fields the readers use, when present, and what each must be
    "step": _count,
    "epoch": lambda v: v is None or _count(v),
    "pid": _count,
    "exit_code": _exit_code,
    "steps_per_s": lambda v: _finite(v) and v >= 0,
    "metric": lambda v: v is None or _finite(v),
}
REQUIRED = {  # the fields each kind of record is written with and read for
    "start": ("step",),
    "resume": ("step",),
    "progress": ("step", "pid", "steps_per_s"),
    "save": ("step",),
    "preempt": ("step", "exit_code"),
    "rescue": ("step",),
    "exit": ("exit_code",),
}


def usable(record: dict[str, Any], now: float) -> bool:
    """Whether every field the readers use is present where required and of the expected type."""
    if not 0 <= record["time"] <= now + CLOCK_SKEW_S:
        return False
    if any(name not in record for name in REQUIRED.get(record["event"], ())):
        return False
    return all(check(record[name]) for name, check in FIELDS.items() if name in record)


def run_events(save_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The usable records of ``SAVE_DIR/events.jsonl``, oldest first, and how many others were left out."""
    records = read_events(save_dir)
    now = time.time()
    kept = [record for record in records if usable(record, now)]
    return kept, len(records) - len(kept)


def describe_skipped(skipped: int) -> str:
    """One line for the operator about the records left out ("" when none were)."""
    if not skipped:
        return ""
    noun = "record" if skipped == 1 else "records"
    return f"{skipped} {noun} of events.jsonl skipped (a field of the wrong type: written by something else?)"
