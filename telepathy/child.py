"""One run of the supervised command: start it in its own process group, relay signals to the whole group, hold
what would hurt it, enforce the grace period.

The command may be a telepathy-aware trainer, a shell or a launcher (``bash -c``, ``torchrun``) in front of one, or
a script that knows nothing of telepathy. Signals go to the process group, so they reach the trainer behind a shell.
An aware process says so on the report pipe when it installs its handlers (the handshake,
:func:`telepathy.training_signals.install_signal_handlers`). Until then:

- SIGUSR1 (save and go on) is held: its default action would kill the process. A command that never shakes hands
  never gets it (the supervisor says so);
- SIGTERM, SIGINT and SIGHUP are held for the first few seconds of start-up, so that a trainer still importing torch
  receives them after its handlers are in place; after that they are delivered anyway (an unaware command ends).

A command that exits 0 during those seconds and leaves processes in its process group (``sh -c "train.py &"``, the
trainer still importing torch) is waited for as long as they run: one may be the trainer. The processes a command
leaves are handed to the supervisor (a subreaper) when their parent ends, so their exit codes are known: the run's
code is the worst of the command's and theirs (a failure before a stop code before 0), not the shell's 0 alone. A
process between the command and a trainer (``timeout``, a subshell) is waited for a few seconds after the trainer
ends, and its code stands for the trainer's; a trainer whose code nobody passed on counts as failed unless it
reported its final save. Processes a command leaves running that never shook hands are named, not stopped.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from telepathy import training_signals
from telepathy.disk.events import EventLog
from telepathy.errors import EXIT_USAGE
from telepathy.process_tree import JobTree, Process, process_name

HANDSHAKE_WAIT = 10.0  # seconds an ending signal is held for a command that has not shaken hands yet
CARRIER_WAIT = 5.0  # seconds a process between the command and its ended trainer is waited for (it holds its code)


@dataclass
class Outcome:
    code: int
    ending: int | None  # the signal that asked the command to stop (SIGTERM, SIGINT, SIGHUP), if any
    ending_at: float | None  # time.time() when it arrived
    aware: bool  # the command shook hands
    grace_killed: bool
    usr1_dropped: int  # SIGUSR1s never delivered (the command never shook hands)


class ChildRun:
    def __init__(self, command: Sequence[str], env: dict[str, str], report_w: int, grace_period: float,
                 pending: list[int], events: EventLog, on_report: Callable[[dict], None],
                 preexec: Callable[[], None], tree: JobTree) -> None:  # fmt: skip
        self.command, self.env, self.report_w = list(command), env, report_w
        self.tree = tree  # the supervisor's: which processes are the run's, to kill at grace expiry and reap
        self.grace_period, self.pending, self.events = grace_period, pending, events
        self.on_report, self.preexec = on_report, preexec
        self.aware = False
        self.trainers: list[Process] = []  # processes that installed telepathy's handlers
        self.final_reported = False  # a trainer reported its final save
        self.settled: set[Process] | None = None  # the trainers that had ended when the command ended
        self.command_ended_in_startup = False
        self.carriers: dict[Process, set[Process]] = {}  # each trainer's ancestors, once the command ended
        self.trainers_seen_at = 0.0  # (monotonic) the last time a trainer was seen running
        self.said_waiting = False

    def run(self, read_fd: int) -> Outcome:
        started = time.monotonic()
        try:
            child = subprocess.Popen(self.command, env=self.env, pass_fds=(self.report_w,), preexec_fn=self._in_child)
        except OSError as exc:  # found but not runnable: a bad #! line, no #! at all, not executable
            os.close(self.report_w)
            os.close(read_fd)
            hint = " (a script without a #! line, or one naming a missing interpreter?)" if exc.errno in (
                errno.ENOEXEC, errno.ENOENT) else ""  # fmt: skip
            print(f"[telepathy] cannot start {self.command[0]!r}: {exc.strerror}{hint}", flush=True)
            return Outcome(EXIT_USAGE, None, None, False, False, 0)
        os.close(self.report_w)
        me = Process.of(child.pid)  # (now, while it cannot have been reaped: afterwards its pid may name another)
        reader = threading.Thread(target=self._read_reports, args=(read_fd,), daemon=True)
        reader.start()
        held: list[int] = []
        ending, ending_at, deadline, grace_killed, said_usr1 = None, None, None, False, False
        while self._goes_on(child, me, ending, started):
            while self.pending:
                signum = self.pending.pop(0)
                if signum != signal.SIGUSR1 and ending is None:
                    ending, ending_at = signum, time.time()
                    deadline = time.monotonic() + self.grace_period
                    self.events.emit("signal", signal=training_signals.signal_name(signum),
                                     grace_period=self.grace_period)  # fmt: skip
                if signum not in (signal.SIGUSR1, ending):  # the first stop signal decides; another delivered
                    continue  # with it would win the race (the kernel hands over pending signals lowest first)
                held.append(signum)
            startup_over = time.monotonic() - started > min(HANDSHAKE_WAIT, self.grace_period / 2)
            for signum in list(held):
                if self.aware:  # to the trainers only: a shell or `tee` between us and them must not die of it
                    held.remove(signum)
                    self._send_trainers(me, signum)
                elif signum != signal.SIGUSR1 and startup_over and (me.signal_group(signum) or me.signal(signum)):
                    held.remove(signum)  # (kept while nobody receives it: a trainer that shakes hands later will)
                elif signum == signal.SIGUSR1 and startup_over and not said_usr1:
                    said_usr1 = True
                    print("[telepathy] SIGUSR1 held: the command has not installed telepathy's signal handlers, and "
                          "SIGUSR1 would kill it; nothing is saved", flush=True)  # fmt: skip
            if deadline is not None and time.monotonic() > deadline:
                print(f"[telepathy] trainer did not exit within the {self.grace_period:g}s grace period; killing it",
                      flush=True)  # fmt: skip
                self.events.emit("grace_expired")
                grace_killed = True
                self.tree.kill(me, self.trainers)
                child.wait()
                break
            time.sleep(0.05)
        code = self._run_code(child, me)
        self._leave(me, child.returncode, say=ending is None)  # (before the waits: what ends then is not ours)
        self.tree.reap(child.pid)
        reader.join(timeout=2)
        if ending is None and code in (training_signals.EXIT_REQUEUE, training_signals.EXIT_INTERRUPTED):
            ending = signal.SIGTERM if code == training_signals.EXIT_REQUEUE else signal.SIGINT  # signalled directly
        dropped = sum(1 for s in held if s == signal.SIGUSR1)
        return Outcome(code, ending, ending_at, self.aware, grace_killed, dropped)

    def _goes_on(self, child: subprocess.Popen, me: Process, ending: int | None, started: float) -> bool:
        """The run goes on while its command runs and while a trainer that shook hands runs (it may outlive its
        shell), then for a few seconds while a process between the command and a trainer runs (`timeout`, a
        subshell: it holds the trainer's exit code). After a stop signal: while a process of the run is left (the
        grace period, then SIGKILL), unless every trainer has stopped. A command that exited 0 during start-up with
        nothing shaken hands: while its process group has processes (one may be a trainer still importing torch),
        and through start-up while any process of the run is left."""
        if child.poll() is None:
            return True
        if self.settled is None:  # the command just ended: the trainers already gone ended before it, under it
            self.settled = {trainer for trainer in list(self.trainers) if not trainer.running()}
            self.command_ended_in_startup = time.monotonic() - started <= self._startup_seconds()
        running = [trainer for trainer in list(self.trainers) if trainer.running()]
        for trainer in running:  # (a `timeout` or subshell between the command and its trainer holds its code)
            self.carriers.setdefault(trainer, set()).update(trainer.ancestors(stop=os.getpid()))
        if running:
            self.trainers_seen_at = time.monotonic()
            return True
        carrying = any(c.running() for chain in self.carriers.values() for c in chain)
        if carrying and time.monotonic() - self.trainers_seen_at < CARRIER_WAIT:
            return True
        if self.aware:
            return ending is not None and not self.trainers and bool(self.tree.members(me))
        if ending is not None:
            return bool(self.tree.members(me))
        if time.monotonic() - started <= self._startup_seconds():
            return bool(self.tree.members(me))
        left = self._group(me) if self.command_ended_in_startup and child.returncode == 0 else set()
        if left and not self.said_waiting:
            self.said_waiting = True
            print(f"[telepathy] the command ended during start-up and left {len(left)} process(es) of its process "
                  "group running, none of which installed telepathy's handlers: waiting for them (a trainer still "
                  "starting?); SIGTERM to the wrapper stops them", flush=True)  # fmt: skip
        return bool(left)

    def _startup_seconds(self) -> float:
        return min(HANDSHAKE_WAIT, self.grace_period / 2)

    def _group(self, me: Process) -> set[int]:
        """The live processes of the command's own process group (none once its number names another's)."""
        return set() if me.pid_reused() else self.tree.group_members(me.pid)

    def _run_code(self, child: subprocess.Popen, me: Process) -> int:
        """The command's exit code, made the worst of it and those of the run's processes handed to this process
        (collected here, before :meth:`JobTree.reap` would discard them): its process group, its trainers and the
        processes between them. A trainer's code is known when it or a process between it and the command was
        collected, or when it ended before the command (under it); otherwise, unless it reported its final save,
        the run counts as failed."""
        chains = {c for chain in self.carriers.values() for c in chain}
        collected = self.tree.collect_adopted(me, set(self.trainers) | chains)
        known = set(collected) | {me} | (self.settled or set())
        unknown = [t for t in self.trainers if t not in known and not (self.carriers.get(t, set()) & known)]
        code = worst([child.returncode, *collected.values()])
        if unknown and code == 0 and not self.final_reported:
            print(f"[telepathy] the command ended (exit code 0) before its trainer (pid {unknown[0].pid}), which "
                  "another process reaped: its exit code is unknown and it reported no final save; counted as failed "
                  "(exit 1). Run the trainer in the foreground (no `&`) so that its exit code reaches the wrapper.",
                  flush=True)  # fmt: skip
            code = 1
        return code

    def _leave(self, me: Process, command_code: int, say: bool) -> None:
        """The processes of the run that outlive it (the command left them; none shook hands): named (``say``),
        not stopped, and no longer the run's (a restart's run does not wait for them or take their exit codes)."""
        left = sorted(self.tree.members(me, list(self.trainers)))
        self.tree.disown(left)
        if not left or not say:
            return
        names = ", ".join(f"{pid} ({process_name(pid)})" for pid in left[:5]) + (", ..." if len(left) > 5 else "")
        print(
            f"[telepathy] the command ended (exit code {command_code}) and left {len(left)} process(es) running that "
            f"did not install telepathy's handlers: {names}. They are not supervised and not stopped.",
            flush=True,
        )
        self.events.emit("leftovers", pids=left)

    def _send_trainers(self, me: Process, signum: int) -> None:
        """``signum`` to each process that shook hands and is still there; to the group if none is left."""
        alive = [trainer for trainer in list(self.trainers) if trainer.signal(signum)]
        if not alive:
            me.signal_group(signum) or me.signal(signum)

    def _in_child(self) -> None:
        os.setpgid(0, 0)  # its own process group: signals reach a trainer behind a shell or launcher
        self.preexec()

    def _read_reports(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                if record.get("event") == "save" and record.get("reason") == "final":
                    self.final_reported = True
                if record.get("event") == "handlers":
                    pid, started = record.get("pid"), record.get("started")
                    if type(pid) is int and pid > 1:  # (its start time, from itself: its pid alone may be reused)
                        self.trainers.append(Process(pid, started) if type(started) is int else Process.of(pid))
                    self.aware = True
                self.on_report(record)


STOP_CODES = (training_signals.EXIT_STOPPED_UNSAVED, training_signals.EXIT_REQUEUE, training_signals.EXIT_INTERRUPTED,
              training_signals.EXIT_HANGUP)  # fmt: skip


def worst(codes: list[int]) -> int:
    """The exit code that says the most: a failure (the first) before a stop code (98 before the others) before 0."""
    failures = [c for c in codes if c != 0 and c not in STOP_CODES]
    if failures:
        return failures[0]
    stops = [c for c in codes if c in STOP_CODES]
    if stops:
        return training_signals.EXIT_STOPPED_UNSAVED if training_signals.EXIT_STOPPED_UNSAVED in stops else stops[0]
    return 0
