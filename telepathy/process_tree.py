"""The processes of a supervised job: which belong to it, how to SIGKILL all of them, which to reap.

A launcher's worker may sit in a session of its own (torchrun's), out of reach of a signal to the child's process
group, and a trainer whose shell or launcher died is nobody's child. The supervisor therefore becomes a child
subreaper (Linux): such orphans are handed to it instead of to init, so the grace period's SIGKILL still reaches
them, and it collects their exit status. A program may run the supervisor in-process and have children of its own:
those are never killed or reaped (they were there before, or share the program's process group).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterable

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class JobTree:
    """Held by the supervisor for its whole life (all restarts): it is a subreaper until :meth:`close`."""

    def __init__(self) -> None:
        self.me, self.group = os.getpid(), os.getpgrp()
        self.foreign = {pid for pid, (_, parent, _) in processes().items() if parent == self.me}
        self.was_subreaper = _subreaper()
        _set_subreaper(True)

    def close(self) -> None:
        _set_subreaper(self.was_subreaper)

    def members(self, child: int, aware: Iterable[int] = ()) -> set[int]:
        """The run's processes still alive: the child and its descendants, the orphans handed to this process
        (its children it did not have before, outside its own process group) and ``aware`` (the trainers that
        shook hands, which /proc may not show as descendants)."""
        table = processes()
        found = {child, *aware, *descendants(child, table)}
        for pid, (_, parent, group) in table.items():
            if parent == self.me and pid not in self.foreign and group != self.group:
                found |= {pid, *descendants(pid, table)}
        return {pid for pid in found if pid in table and table[pid][0] not in "ZX"}

    def kill(self, child: int, aware: Iterable[int] = ()) -> None:
        """SIGKILL the child's process group and every member, again while new ones appear (forked meanwhile)."""
        kill_quietly(-child, signal.SIGKILL)
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
        for pid, (state, parent, group) in processes().items():
            if parent == self.me and state == "Z" and pid != child and pid not in self.foreign and group != self.group:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def processes() -> dict[int, tuple[str, int, int]]:
    """Each process's state letter, parent and process group, from /proc (empty where there is none)."""
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


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, which only waits to be reaped, does not): the trainer behind
    `sh -c "train.py; echo done"` or `train.py | tee log` outlives the shell that started it."""
    if not kill_quietly(pid, 0):
        return False
    fields = _stat(pid)
    return fields is None or fields[0] not in ("Z", "X")  # no /proc (macOS): kill(0) said it is there


def _stat(pid: int) -> tuple[str, int, int] | None:
    """State letter, parent and process group of ``pid`` from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int, table: dict[int, tuple[str, int, int]] | None = None) -> list[int]:
    """The processes whose chain of parents leads to ``root``."""
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _) in (processes() if table is None else table).items():
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


def kill_quietly(pid: int, signum: int) -> bool:
    """Send ``signum`` to ``pid``; False when it is gone."""
    try:
        os.kill(pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
