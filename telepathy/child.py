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
"""

from __future__ import annotations

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
                 preexec: Callable[[], None]) -> None:  # fmt: skip
        self.command, self.env, self.report_w = list(command), env, report_w
        self.grace_period, self.pending, self.events = grace_period, pending, events
        self.on_report, self.preexec = on_report, preexec
        self.aware = False

    def run(self, read_fd: int) -> Outcome:
        started = time.monotonic()
        child = subprocess.Popen(self.command, env=self.env, pass_fds=(self.report_w,), preexec_fn=self._in_child)
        os.close(self.report_w)
        reader = threading.Thread(target=self._read_reports, args=(read_fd,), daemon=True)
        reader.start()
        held: list[int] = []
        ending, ending_at, deadline, grace_killed, said_usr1 = None, None, None, False, False
        while child.poll() is None:
            while self.pending:
                signum = self.pending.pop(0)
                if signum != signal.SIGUSR1 and ending is None:
                    ending, ending_at = signum, time.time()
                    deadline = time.monotonic() + self.grace_period
                    self.events.emit("signal", signal=training_signals.signal_name(signum),
                                     grace_period=self.grace_period)  # fmt: skip
                held.append(signum)
            startup_over = time.monotonic() - started > min(HANDSHAKE_WAIT, self.grace_period / 2)
            for signum in list(held):
                if self.aware or (signum != signal.SIGUSR1 and startup_over):
                    held.remove(signum)
                    _send_group(child, signum)
                elif signum == signal.SIGUSR1 and startup_over and not said_usr1:
                    said_usr1 = True
                    print("[telepathy] SIGUSR1 held: the command has not installed telepathy's signal handlers, and "
                          "SIGUSR1 would kill it; nothing is saved", flush=True)  # fmt: skip
            if deadline is not None and time.monotonic() > deadline:
                print(f"[telepathy] trainer did not exit within the {self.grace_period:g}s grace period; killing it",
                      flush=True)  # fmt: skip
                self.events.emit("grace_expired")
                grace_killed = True
                _send_group(child, signal.SIGKILL)
                child.wait()
                break
            time.sleep(0.05)
        reader.join(timeout=2)
        code = child.returncode
        if ending is None and code in (training_signals.EXIT_REQUEUE, training_signals.EXIT_INTERRUPTED):
            ending = signal.SIGTERM if code == training_signals.EXIT_REQUEUE else signal.SIGINT  # signalled directly
        dropped = sum(1 for s in held if s == signal.SIGUSR1)
        return Outcome(code, ending, ending_at, self.aware, grace_killed, dropped)

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
                    self.aware = True
                self.on_report(record)


def _send_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass
