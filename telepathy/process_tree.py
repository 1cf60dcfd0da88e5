"""The processes of a supervised job: which belong to it, how to SIGKILL all of them, which to reap.

A launcher's worker may sit in a session of its own (torchrun's), out of reach of a signal to the child's process
group, and a trainer whose shell or launcher died is nobody's child. The supervisor therefore becomes a child
subreaper (Linux): such orphans are handed to it instead of to init, so the grace period's SIGKILL still reaches
them, and it collects their exit status. A program may run the supervisor in-process and have children of its own:
those are never killed or reaped (they were there before, or share the program's process group).

A pid names a process only until the process is reaped; then the kernel may give it to another (pid_max is often
32768). A process the supervisor signals later is therefore held as a :class:`Process`, its pid with its start
time, and signalled through a pidfd only while both still match: a reused pid is never signalled.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import NamedTuple

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class Process(NamedTuple):
    """One process: its pid and its start time (clock ticks after boot; None where there is no /proc)."""

    pid: int
    started: int | None

    @classmethod
    def of(cls, pid: int) -> Process:
        """The process that has ``pid`` now (the caller knows it is the one: its own unreaped child)."""
        fields = _stat(pid)
        return cls(pid, None if fields is None else fields[3])

    def _is_me(self, fields: tuple[str, int, int, int]) -> bool:
        """Whether ``fields`` (/proc/PID/stat of ``pid``) are this process's, not a later one's with its pid."""
        return self.started in (None, fields[3])

    def is_current(self) -> bool:
        """Whether ``pid`` still names this process (a zombie included: it was not reaped yet)."""
        fields = _stat(self.pid)
        if fields is None:  # gone, or no /proc (macOS): kill(0) tells
            return self.started is None and kill_quietly(self.pid, 0)
        return self._is_me(fields)

    def running(self) -> bool:
        """Whether this process still runs (a zombie, which only waits to be reaped, does not): the trainer behind
        `sh -c "train.py; echo done"` or `train.py | tee log` outlives the shell that started it."""
        fields = _stat(self.pid)
        if fields is None:
            return self.started is None and kill_quietly(self.pid, 0)
        return self._is_me(fields) and fields[0] not in ("Z", "X")

    def signal(self, signum: int) -> bool:
        """Send ``signum`` if ``pid`` is still this process; False when it is not (gone, or its pid reused). A pidfd
        holds the process while its start time is checked, so that it cannot be replaced in between."""
        try:
            handle = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        except (AttributeError, OSError):  # (no pidfd: not Linux, or a kernel before 5.3)
            handle = None
        try:
            if not self.is_current():
                return False
            if handle is None:
                os.kill(self.pid, signum)
            else:
                signal.pidfd_send_signal(handle, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False
        finally:
            if handle is not None:
                os.close(handle)

    def ancestors(self, stop: int) -> list[Process]:
        """Its parent, the parent's parent, ... up to (not including) ``stop`` or init, while each is known."""
        found, fields = [], _stat(self.pid)
        for _ in range(64):
            if fields is None or fields[1] in (0, 1, stop):
                break
            pid = fields[1]
            fields = _stat(pid)  # (the parent's, read once: the next round walks on from it)
            if fields is None:
                break
            found.append(Process(pid, fields[3]))
        return found

    def pid_reused(self) -> bool:
        """Whether ``pid`` now names another process."""
        fields = _stat(self.pid)
        return fields is not None and not self._is_me(fields)

    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the process group this process leads, unless its pid now names another process
        (then the group is not this one's: while a group has members, its number is not given out again)."""
        return not self.pid_reused() and kill_quietly(-self.pid, signum)


class JobTree:
    """Held by the supervisor for its whole life (all restarts): it is a subreaper until :meth:`close`."""

    def __init__(self) -> None:
        self.me, self.group = os.getpid(), os.getpgrp()
        self.foreign = {(pid, started) for pid, (_, parent, _, started) in processes().items() if parent == self.me}
        self.left: set[tuple[int, int]] = set()  # processes a run left behind (named once, then not members)
        self.was_subreaper = _subreaper()
        _set_subreaper(True)

    def close(self) -> None:
        _set_subreaper(self.was_subreaper)

    def members(self, child: Process, aware: Iterable[Process] = ()) -> set[int]:
        """The run's processes still alive: the child and its descendants, the orphans handed to this process
        (its children it did not have before, outside its own process group) and ``aware`` (the trainers that
        shook hands, which /proc may not show as descendants). A pid that now names another process is not one."""
        table = processes()
        found = {p.pid for p in aware if _is(p, table)}
        if _is(child, table):
            found |= {child.pid, *descendants(child.pid, table)}
        for pid, (_, parent, group, started) in table.items():
            if parent == self.me and (pid, started) not in self.foreign and group != self.group:
                found |= {pid, *descendants(pid, table)}
        return {
            pid for pid in found if pid in table and table[pid][0] not in "ZX" and _key(pid, table) not in self.left
        }

    def group_members(self, group: int) -> set[int]:
        """The live processes of process group ``group`` (not those left behind by an earlier run)."""
        table = processes()
        return {pid for pid, (state, _, of, _) in table.items()
                if of == group and state not in "ZX" and _key(pid, table) not in self.left}  # fmt: skip

    def disown(self, pids: Iterable[int]) -> None:
        """Processes a run left behind: no longer members of later runs (still reaped when they end)."""
        table = processes()
        self.left |= {_key(pid, table) for pid in pids if pid in table}

    def collect_adopted(self, child: Process, also: set[Process], patience: float = 5.0) -> dict[Process, int]:
        """The exit codes of the run's processes that were handed to this process and have ended: zombies of the
        command's process group, and those in ``also`` (its trainers and the processes between them). Each is
        waited for until its last thread is gone, all together for at most ``patience`` seconds (a thread stuck
        in the kernel must not hold the supervisor)."""
        deadline, codes = time.monotonic() + patience, {}
        for pid, (state, parent, group, started) in processes().items():
            process = Process(pid, started)
            if (parent != self.me or state != "Z" or pid == child.pid or (pid, started) in self.foreign | self.left
                    or (group != child.pid and process not in also)):  # fmt: skip
                continue  # (an earlier run's are reaped by reap(); the host program's own are not ours to take)
            while True:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)  # (a zombie of ours: its pid is not reused yet)
                except ChildProcessError:
                    break
                if done == pid:
                    codes[process] = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        return codes

    def kill(self, child: Process, aware: Iterable[Process] = ()) -> None:
        """SIGKILL the child's process group and every member, again while new ones appear (forked meanwhile)."""
        aware = list(aware)
        child.signal_group(signal.SIGKILL)
        for _ in range(10):
            alive = self.members(child, aware)
            if not alive:
                return
            for pid in alive:
                kill_quietly(pid, signal.SIGKILL)
            time.sleep(0.05)

    def reap(self, child: int) -> None:
        """Collect the exit status of orphans handed to this process that have ended (each would stay a zombie):
        never the run's own child (``subprocess`` collects it) or one of the program's own children."""
        for pid, (state, parent, group, started) in processes().items():
            if (parent == self.me and state == "Z" and pid != child and (pid, started) not in self.foreign
                    and group != self.group):  # fmt: skip
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def processes() -> dict[int, tuple[str, int, int, int]]:
    """Each process's state letter, parent, process group and start time, from /proc (empty where there is
    none)."""
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return {}
    table = {}
    for name in names:
        fields = _stat(int(name))
        if fields is not None:  # (else gone meanwhile)
            table[int(name)] = fields
    return table


def _key(pid: int, table: dict[int, tuple[str, int, int, int]]) -> tuple[int, int]:
    return pid, table[pid][3]


def _is(process: Process, table: dict[int, tuple[str, int, int, int]]) -> bool:
    """Whether ``process`` is the one its pid names in ``table``."""
    row = table.get(process.pid)
    return row is not None and (process.started is None or row[3] == process.started)


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """State letter, parent, process group and start time of ``pid`` from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int, table: dict[int, tuple[str, int, int, int]] | None = None) -> list[int]:
    """The processes whose chain of parents leads to ``root``."""
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _, _) in (processes() if table is None else table).items():
        children.setdefault(parent, []).append(pid)
    found, pending = [], [root]
    while pending:
        for pid in children.get(pending.pop(), ()):
            found.append(pid)
            pending.append(pid)
    return found


def _subreaper() -> bool:
    if _LIBC is None:
        return False
    flag = ctypes.c_int(0)
    _LIBC.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag))
    return bool(flag.value)


def _set_subreaper(on: bool) -> None:
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_CHILD_SUBREAPER, int(on))


def process_name(pid: int) -> str:
    """The command name of ``pid`` (/proc/PID/comm), or "?"."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return "?"


def kill_quietly(pid: int, signum: int) -> bool:
    """Send ``signum`` to ``pid``; False when it is gone."""
    try:
        os.kill(pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
