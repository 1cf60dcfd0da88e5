"""The supervising wrapper: runs the trainer as a child, forwards signals, enforces the grace period.

The supervisor never blocks on the child: its main loop wakes every 50 ms (or at once on a signal), so it
stays responsive even if the child hangs. The child reports events (commits among them) through a pipe
(``telepathy.disk.events``), read by a background thread, so no log text is parsed.

Exit codes: 0 training complete; 99 stopped by SIGTERM with a checkpoint committed for the stop (by the trainer,
or by the supervisor's rescue of its last snapshot after a grace-period overrun); 130 and 129 the same after SIGINT
and SIGHUP; 98 stopped by a signal with nothing new saved (the next run resumes from an older checkpoint or starts
over); anything else is the child's failure.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from telepathy import training_signals
from telepathy.child import ChildRun, Outcome
from telepathy.disk import slots
from telepathy.disk.contents import MANIFEST
from telepathy.disk.events import EventLog
from telepathy.disk.lock import busy_message
from telepathy.disk.manifest import read_manifest
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import (
    EXIT_HANGUP,
    EXIT_INTERRUPTED,
    EXIT_REQUEUE,
    EXIT_SAVE_DIR_BUSY,
    EXIT_STOPPED_UNSAVED,
    NOT_RESTARTED,
    CheckpointInvalid,
)
from telepathy.process_tree import JobTree
from telepathy.rescue import how_it_ended, rescue
from telepathy.training_signals import REPORT_FD_ENV

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
KNOWN_EXITS = (training_signals.EXIT_COMPLETE, training_signals.EXIT_REQUEUE, training_signals.EXIT_INTERRUPTED)
SLURM_IDS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the forked child: a supervisor that is killed (``kill -9``, OOM) takes its trainer with it, so no
    orphan goes on writing to the save dir next to the job that resumes it (Linux; elsewhere a no-op)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
            os._exit(1)


class Supervisor:
    def __init__(self, command: Sequence[str], save_dir: str | os.PathLike, grace_period: float,
                 max_restarts: int = 0, restart_backoff: float = 2.0,
                 restart_command: Sequence[str] | None = None) -> None:  # fmt: skip
        self.command = list(command)
        self.restart_command = list(restart_command or command)  # e.g. with --auto_resume added
        self.save_dir = Path(save_dir)
        self.grace_period = grace_period
        self.max_restarts = max_restarts
        self.restart_backoff = restart_backoff
        self.events = EventLog(save_dir, "supervisor")
        self.pending: list[int] = []  # signals to forward; appended by the handler
        self.last_commit: dict | None = None
        self.last_commit_at: float | None = None  # when the last commit was reported (time.time())
        self.child_started_at = 0.0  # when the current trainer was started (time.time())
        self.slot_dir = Path()  # shared-memory snapshots of a trainer with snapshot_every_step (made by run)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending.append(signum)  # flag only; forwarded from the main loop

    def run(self, early_signals: list[int] | None = None) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        self.pending.extend(early_signals or [])
        self.slot_dir = slots.make_slot_dir()
        self.tree = JobTree()  # a trainer whose shell or launcher dies stays within reach of the grace period's SIGKILL
        try:
            return self._run()
        finally:
            self.tree.close()
            slots.remove_slot_dir(self.slot_dir)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run(self) -> int:
        if SaveDir(self.save_dir).live_writer():  # refuse at once, before a slow trainer start-up (read-only probe)
            print(f"[telepathy] {busy_message(self.save_dir)}", flush=True)
            return EXIT_SAVE_DIR_BUSY
        slurm = {k: os.environ[k] for k in SLURM_IDS if k in os.environ}
        if slurm:
            print("[telepathy] " + " ".join(f"{k}={v}" for k, v in slurm.items()), flush=True)
        self.events.emit("supervisor_start", command=self.command, **slurm)
        restarts = 0
        while True:
            before = self._newest_step()
            out = self._run_child()
            code = out.code
            if code not in KNOWN_EXITS + NOT_RESTARTED or out.grace_killed:
                self._rescue(code, out.grace_killed)
            if self._newest_step() > before:
                restarts = 0  # it made progress: max_restarts counts failures in a row, not a long run's kills
            if out.ending is not None and code not in NOT_RESTARTED:  # stopped by a signal: was it saved?
                code = self._stop_code(out)
            elif code not in KNOWN_EXITS + NOT_RESTARTED and restarts < self.max_restarts:
                restarts += 1
                delay = restart_delay(self.restart_backoff, restarts)
                print(f"[telepathy] trainer failed with exit code {code}; restart {restarts}/{self.max_restarts} "
                      f"from the newest valid checkpoint in {delay:.0f}s", flush=True)  # fmt: skip
                self.events.emit("restart", after_exit_code=code, restart=restarts)
                stop = self._sleep_unless_stopped(delay)
                if stop is not None:  # asked to stop while waiting: no new trainer to start and save nothing
                    print(f"[telepathy] stopped by {training_signals.signal_name(stop)} while waiting to restart the "
                          f"trainer; not restarted, nothing new saved (exit {EXIT_STOPPED_UNSAVED}). "
                          f"{self._next_run()}", flush=True)  # fmt: skip
                    self.events.emit("exit", exit_code=EXIT_STOPPED_UNSAVED, last_commit=self.last_commit)
                    return EXIT_STOPPED_UNSAVED
                self.command = self.restart_command
                continue
            self.events.emit("exit", exit_code=code, last_commit=self.last_commit)
            if code in NOT_RESTARTED:
                print(f"[telepathy] the trainer refused to run (exit code {code}; see the log above); not run again: "
                      "it would refuse the same way", flush=True)  # fmt: skip
            elif code not in KNOWN_EXITS + (EXIT_STOPPED_UNSAVED, EXIT_HANGUP):
                print(f"[telepathy] trainer failed (exit code {code}); see the log above. {self._next_run()}",
                      flush=True)  # fmt: skip
            return code

    def _sleep_unless_stopped(self, seconds: float) -> int | None:
        """Sleep, unless a stop signal (SIGTERM, SIGINT, SIGHUP) arrives: then return it at once (the grace period
        runs; under SLURM a restart backoff longer than it would end in SIGKILL and no requeue)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stop = next((s for s in self.pending if s != signal.SIGUSR1), None)
            if stop is not None:
                return stop
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        return None

    def _stop_code(self, out: Outcome) -> int:
        """99 (130 after SIGINT, 129 after SIGHUP) only when a checkpoint was committed for this stop; else 98.
        For this stop: committed after the signal reached this process, or — when the signal reached the trainer
        first (SLURM signals every process of a job step) — a save this trainer reported for that signal."""
        final = (self.last_commit or {}).get("reason") == "final"
        final = final and (self.last_commit_at or 0) >= self.child_started_at
        if out.code == training_signals.EXIT_COMPLETE and final:  # it had finished (its final save) by then
            return training_signals.EXIT_COMPLETE  # (the exit code alone would not say: a shell's may be 0)
        saved = self.last_commit_at is not None and (out.ending_at is None or self.last_commit_at >= out.ending_at)
        if not saved and out.ending is not None and self.last_commit and self.last_commit_at is not None:
            for_this_signal = self.last_commit.get("reason") == f"signal:{training_signals.signal_name(out.ending)}"
            saved = for_this_signal and self.last_commit_at >= self.child_started_at
        if not saved and out.ending is not None:
            saved = self._committed_unannounced(out.ending)
        rescued = saved and str((self.last_commit or {}).get("reason", "")).startswith("rescue:")
        if (out.code == EXIT_STOPPED_UNSAVED and not rescued) or not saved:  # (98 then rescued: a step committed)
            print(f"[telepathy] stopped by {training_signals.signal_name(out.ending)} with nothing new saved "
                  f"(exit {EXIT_STOPPED_UNSAVED}). {self._next_run()}", flush=True)  # fmt: skip
            return EXIT_STOPPED_UNSAVED
        return {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGHUP: EXIT_HANGUP}.get(out.ending, EXIT_REQUEUE)

    def _committed_unannounced(self, ending: int) -> bool:
        """A checkpoint for this signal that the trainer committed without telling us: a launcher that closes
        inherited descriptors (torchrun starts its workers with ``close_fds``) cuts the report pipe. The newest
        committed checkpoint counts when its manifest names this signal and was written while this trainer ran."""
        committed = SaveDir(self.save_dir).committed()
        if not committed:
            return False
        try:
            doc = read_manifest(committed[-1].path)
            written = (committed[-1].path / MANIFEST).stat().st_mtime
        except (CheckpointInvalid, OSError):
            return False
        return (
            doc.get("reason") == f"signal:{training_signals.signal_name(ending)}" and written >= self.child_started_at
        )

    def _next_run(self) -> str:
        committed = SaveDir(self.save_dir).committed()
        if not committed:
            return "The next run starts from scratch: no checkpoint is committed."
        return f"The next run resumes from the newest valid checkpoint ({committed[-1].path.name} or older)."

    def _run_child(self) -> Outcome:
        """Run the command once (see :mod:`telepathy.child`)."""
        read_fd, write_fd = os.pipe()
        self.child_started_at = time.time()
        slots.clear_slots(self.slot_dir)  # a new trainer's snapshots only
        env = {**os.environ, REPORT_FD_ENV: str(write_fd), slots.SLOT_DIR_ENV: str(self.slot_dir)}
        run = ChildRun(self.command, env, write_fd, self.grace_period, self.pending, self.events, self._on_report,
                       functools.partial(_die_with_parent, os.getpid()), self.tree)  # fmt: skip
        out = run.run(read_fd)
        if out.usr1_dropped:
            print(f"[telepathy] {out.usr1_dropped} SIGUSR1 not delivered: the command never installed telepathy's "
                  "signal handlers (it would have been killed)", flush=True)  # fmt: skip
        return out

    def _newest_step(self) -> int:
        committed = SaveDir(self.save_dir).committed()
        return committed[-1].step if committed else -1

    def _rescue(self, code: int, grace_killed: bool) -> None:
        """The trainer ended without committing its last steps: commit its newest shared-memory snapshot."""
        how = "grace period overrun" if grace_killed else how_it_ended(code)
        try:
            rescued = rescue(self.slot_dir, self.save_dir, how)
        except Exception as exc:  # the rescue is a bonus; the committed checkpoints stand
            print(f"[telepathy] could not commit the trainer's last snapshot: {exc}", flush=True)
            self.events.emit("rescue_failed", error=str(exc))
            return
        if rescued is not None:
            step, path = rescued
            print(f"[telepathy] trainer ended ({how}); committed its step-{step} snapshot from shared memory: "
                  f"{path}", flush=True)  # fmt: skip
            self.events.emit("rescue", step=step, path=str(path), how=how)
            self.last_commit = {"event": "save", "step": step, "path": str(path), "reason": f"rescue:{how}"}
            self.last_commit_at = time.time()

    def _on_report(self, record: dict) -> None:
        if record.get("event") == "save":
            self.last_commit, self.last_commit_at = record, time.time()


def supervise(command: Sequence[str], save_dir: str | os.PathLike, grace_period: float, max_restarts: int = 0,
              restart_command: Sequence[str] | None = None, restart_backoff: float = 2.0,
              early_signals: list[int] | None = None) -> int:  # fmt: skip
    """Run ``command`` under a :class:`Supervisor`; returns the exit code to use. ``early_signals``: signals the
    program caught before the supervisor ran (they are acted on as if they arrived now)."""
    sys.stdout.flush()
    training_signals.ignore_at_exit(FORWARDED)  # the exit code is decided here: a late signal must not replace it
    supervisor = Supervisor(command, save_dir, grace_period, max_restarts, restart_backoff, restart_command)
    return supervisor.run(early_signals)


MAX_RESTART_DELAY = 3600.0  # the backoff doubles per failure in a row, up to an hour (never days of a held allocation)


def restart_delay(backoff: float, restarts: int) -> float:
    """Seconds to wait before restart number ``restarts`` (1, 2, ...) of failures in a row."""
    return min(backoff * 2.0 ** min(restarts - 1, 64), max(backoff, MAX_RESTART_DELAY))
