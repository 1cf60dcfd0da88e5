"""When to save, in one place: a signal asked, the interval passed, or N steps went by; and whether to stop.

The :class:`~telepathy.checkpointer.Checkpointer` owns one policy. At each step boundary it asks the policy what
this process would act on (:meth:`SavePolicy.requests`); with several ranks those requests are combined first
(:func:`telepathy.distributed.agree`: a save or a stop anywhere is a save or a stop everywhere), then
:meth:`SavePolicy.decide` turns them into one decision and consumes the signal's save request. Signals only set
flags (:mod:`telepathy.training_signals`); nothing here runs in a handler.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

from telepathy import training_signals
from telepathy.errors import UsageError


@dataclass(frozen=True)
class Requests:
    """What one process (or, combined, every rank) would act on at a step boundary."""

    save: bool = False  # a signal asked for a save
    due: bool = False  # the interval passed or the step count came round
    exit_signum: int = 0  # the signal that asked to stop; 0: none

    def as_ints(self) -> list[int]:
        return [int(self.save), int(self.due), int(self.exit_signum)]

    @classmethod
    def from_ints(cls, values: list[int]) -> Requests:
        return cls(bool(values[0]), bool(values[1]), int(values[2]))


@dataclass(frozen=True)
class Decision:
    save: bool
    stop: bool
    reason: str  # "signal:SIGTERM", "interval", "steps": recorded in the manifest and events.jsonl


def check_interval(interval: float | None) -> float | None:
    """``interval`` if it is a usable number of seconds (or None: no periodic saves by time)."""
    if interval is not None and not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
        raise UsageError(f"checkpoint interval must be a finite number of seconds > 0 (or None), got {interval!r}; "
                         "to save at every step use every_steps=1 (--save_every_steps 1)")  # fmt: skip
    return interval


def check_every_steps(every_steps: int | None) -> int | None:
    if every_steps is not None and (
        isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1
    ):
        raise UsageError(f"every_steps must be a whole number of steps >= 1 (or None), got {every_steps!r}")
    return every_steps


class SavePolicy:
    """``interval`` seconds between periodic saves (None: none by time), ``every_steps`` (None: none by count; 1:
    every step), decisions taken every ``agree_every`` steps (several ranks: the cost of agreeing)."""

    def __init__(self, interval: float | None = None, every_steps: int | None = None, agree_every: int = 1) -> None:
        self.interval = check_interval(interval)
        self.every_steps = check_every_steps(every_steps)
        if isinstance(agree_every, bool) or not isinstance(agree_every, int) or agree_every < 1:
            raise UsageError(f"agree_every must be a whole number of steps >= 1, got {agree_every!r}")
        self.agree_every = agree_every
        self._last_save = time.monotonic()
        self._due_reason = "interval"

    def saved(self) -> None:
        """A checkpoint was committed (or a save failed and should wait an interval before trying again)."""
        self._last_save = time.monotonic()

    def seconds_since_save(self) -> float:
        return time.monotonic() - self._last_save

    def decides_at(self, step: int) -> bool:
        """Whether this step boundary takes decisions (every ``agree_every`` steps)."""
        return step % self.agree_every == 0

    def requests(self, step: int) -> Requests:
        """What this process would act on now, consuming nothing."""
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.interval is not None and self.seconds_since_save() >= self.interval
        self._due_reason = "interval" if by_time else "steps"
        exit_signum = training_signals.exit_signal() or 0
        return Requests(training_signals.save_requested(), by_steps or by_time, exit_signum)

    def decide(self, agreed: Requests) -> Decision:
        """The decision for requests every rank shares; consumes this process's signal save request when saving."""
        stop = bool(agreed.exit_signum)
        if stop:
            training_signals.adopt_exit_signal(agreed.exit_signum)
        asked_by = training_signals.take_save_request() if agreed.save else None
        if stop:
            reason = f"signal:{training_signals.signal_name(agreed.exit_signum)}"
        elif agreed.save:
            reason = f"signal:{training_signals.signal_name(asked_by or signal.SIGUSR1)}"
        else:
            reason = self._due_reason if agreed.due else "none"
        return Decision(save=agreed.save or agreed.due or stop, stop=stop, reason=reason)
