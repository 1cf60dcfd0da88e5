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

A command that ends during those seconds and leaves processes running (``sh -c "train.py &"``) may have left a
trainer that is still starting: the run waits out the start-up seconds for it to shake hands, then supervises it.
Such a trainer is handed to the supervisor when its shell ends, and its exit code, not the shell's, is the run's.
Processes the command leaves behind that never shake hands are named, not stopped.
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
                elif signum != signal.SIGUSR1 and startup_over:
                    held.remove(signum)
                    me.signal_group(signum) or me.signal(signum)
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
        adopted = self._adopted_trainers_code()
        self.tree.reap(child.pid)
        reader.join(timeout=2)
        code = child.returncode if adopted is None else adopted
        if ending is None:
            self._name_leftovers(me, code)
        if ending is None and code in (training_signals.EXIT_REQUEUE, training_signals.EXIT_INTERRUPTED):
            ending = signal.SIGTERM if code == training_signals.EXIT_REQUEUE else signal.SIGINT  # signalled directly
        dropped = sum(1 for s in held if s == signal.SIGUSR1)
        return Outcome(code, ending, ending_at, self.aware, grace_killed, dropped)

    def _goes_on(self, child: subprocess.Popen, me: Process, ending: int | None, started: float) -> bool:
        """The run goes on while its command runs, while a trainer that shook hands runs (it may outlive its shell),
        after a stop signal while any process of the run is left (it has the grace period, then SIGKILL), and
        through start-up while a command that ended left processes and nothing shook hands yet (a trainer behind
        ``sh -c "train.py &"`` may still be importing torch)."""
        if child.poll() is None or any(trainer.running() for trainer in list(self.trainers)):
            return True
        if ending is None and (self.aware or time.monotonic() - started > min(HANDSHAKE_WAIT, self.grace_period / 2)):
            return False
        return bool(self.tree.members(me, list(self.trainers)))

    def _adopted_trainers_code(self) -> int | None:
        """The exit code of the trainers that were handed to this process (their shell ended first), collected
        before :meth:`JobTree.reap` would discard it: the first that is not 0, else 0; None when none was."""
        codes = []
        for trainer in list(self.trainers):
            fields = trainer.state_and_parent()
            if fields != ("Z", os.getpid()):
                continue  # (another's child, still running, or gone)
            try:
                pid, status = os.waitpid(trainer.pid, os.WNOHANG)  # (a zombie of ours: its pid is not reused yet)
            except ChildProcessError:
                continue
            if pid == trainer.pid:
                codes.append(os.waitstatus_to_exitcode(status))
        return None if not codes else next((c for c in codes if c != 0), 0)

    def _name_leftovers(self, me: Process, code: int) -> None:
        """Say which processes of the run outlive it (the command left them; none shook hands): not stopped."""
        left = sorted(self.tree.members(me, list(self.trainers)))
        if not left:
            return
        names = ", ".join(f"{pid} ({process_name(pid)})" for pid in left[:5]) + (", ..." if len(left) > 5 else "")
        print(
            f"[telepathy] the command ended (exit code {code}) and left {len(left)} process(es) running that did "
            f"not install telepathy's handlers: {names}. They are not supervised and not stopped.",
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
                if record.get("event") == "handlers":
                    pid, started = record.get("pid"), record.get("started")
                    if type(pid) is int and pid > 1:  # (its start time, from itself: its pid alone may be reused)
                        self.trainers.append(Process(pid, started) if type(started) is int else Process.of(pid))
                    self.aware = True
                self.on_report(record)
