"""One writer per save directory.

Two processes saving into one directory (a misconfigured job array, a requeued job overlapping a straggler) would
prune and clean up each other's files. The writer holds an exclusive ``flock`` on ``SAVE_DIR/.telepathy.lock`` for
as long as it lives and records who it is in ``SAVE_DIR/.telepathy.lock.json``; a second writer is refused at once
with a message naming the holder. The kernel releases a ``flock`` when its holder dies (SIGKILL, OOM), so a dead
holder's lock is taken over without any staleness guesswork. On NFS, Linux maps ``flock`` to NFS byte-range locks,
which the server releases when the client's lease expires (about 90 s after a node is lost).

Written here rather than with a lock library because a save dir is untrusted ground: the lock file is opened
without following a symlink and never truncated, and a lock whose file was deleted (``rm D/.telepathy.lock``,
``rm -rf D``) is noticed — the holder stops committing (:meth:`SaveDirLock.check_still_held`) and a newcomer is
refused while the recorded holder is alive.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from telepathy.disk import durable
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import SaveDirBusy, UsageError

_HELD: dict[tuple[int, int], list[int]] = {}  # (dev, inode) of a lock file -> [fd, acquisitions] in this process


def _drop_inherited_locks() -> None:
    """In a child forked from a writer (a DataLoader worker): close its copies of the lock descriptors. A flock
    belongs to the open file, so a child that kept one would hold the lock after the writer was SIGKILLed (OOM)
    and the restarted writer would be refused until the orphaned child exits. Closing (not unlocking) leaves the
    writer's lock as it is."""
    for fd, _ in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class SaveDirLock:
    """Exclusive, per-process-reentrant writer lock on a save directory (held until :meth:`release` or exit)."""

    def __init__(self, save_dir: str | os.PathLike) -> None:
        self.save_dir = Path(save_dir)
        self.dir = SaveDir(save_dir)
        self._key: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._key is not None and self._key in _HELD  # (not in a process forked from the writer)

    def acquire(self) -> None:
        """Take the lock or raise :class:`SaveDirBusy` naming the current holder."""
        if self.held:
            return
        path = self.dir.lock_file
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{path} is a symbolic link; telepathy writes only regular files inside the save "
                                 "dir: remove the link") from None  # fmt: skip
            raise
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in _HELD:  # this process holds it already (another Checkpointer, the supervisor's rescue)
            os.close(fd)
            _HELD[key][1] += 1
            self._key = key
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SaveDirBusy(busy_message(self.save_dir)) from None
        holder = _read_holder(self.save_dir)
        if holder is not None and _alive_elsewhere(holder):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise SaveDirBusy(busy_message(self.save_dir) + " (its lock file was removed while it ran; it still "
                              "does)")  # fmt: skip
        _HELD[key] = [fd, 1]
        self._key = key
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
                  "since": round(time.time(), 3), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                  "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}  # fmt: skip
        try:
            durable.atomic_write_bytes(self.dir.holder_file, json.dumps(record).encode())
        except OSError:
            pass  # who holds it is a courtesy for status; the flock is the lock

    def check_still_held(self) -> None:
        """Raise :class:`SaveDirBusy` when the lock file this process holds is no longer the save dir's (deleted or
        replaced): another run may be writing there now, so nothing may be committed or pruned."""
        if self._key is None:
            return
        if self._key not in _HELD:
            raise SaveDirBusy(f"this process was forked from the writer of {self.save_dir} and does not hold its "
                              "lock; only the writer commits or prunes there")  # fmt: skip
        try:
            st = os.stat(self.dir.lock_file, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._key:
                return
        except OSError:
            pass
        raise SaveDirBusy(f"{self.save_dir} is no longer this run's: its lock file was removed or replaced while it "
                          "ran, so another run may write there; stopping without committing or pruning")  # fmt: skip

    def release(self) -> None:
        if self._key is None:
            return
        entry = _HELD.get(self._key)
        self._key, key = None, self._key
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            holder = _read_holder(self.save_dir)
            if holder is not None and holder.get("pid") == os.getpid():  # say it is free (status, a newcomer)
                try:
                    record = json.dumps({**holder, "released": round(time.time(), 3)}).encode()
                    durable.atomic_write_bytes(self.dir.holder_file, record)
                except OSError:
                    pass
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])


def _read_holder(save_dir: str | os.PathLike) -> dict | None:
    path = SaveDir(save_dir).holder_file
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 16:  # a FIFO blocks; huge: not ours
            return None
        holder = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError, RecursionError):
        return None
    return holder if isinstance(holder, dict) else None


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a ``/proc/PID/stat`` or ``/proc/PID/task/TID/stat`` after the command name, from the state
    on (Linux); None when unreadable."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid``; None when unreadable."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return None if fields is None else (fields[0], fields[19])


def _start_time(pid: int) -> str | None:
    """The process's start time, which tells a live holder from a reused pid."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


HOLDER_EXIT_WAIT = 2.0  # seconds a holder whose flock is gone may take to finish dying


def _alive_elsewhere(holder: dict) -> bool:
    """Whether the recorded holder is another process, alive, on this host (its start time matches). Called once
    its flock was taken, which a live holder keeps unless its lock file was replaced: a holder that is dying
    (SIGKILLed with its supervisor, files already closed) or dead and not yet reaped (a zombie: the init of a
    container may reap late, or never) is given :data:`HOLDER_EXIT_WAIT` seconds to show it, and does not count."""
    pid = holder.get("pid")
    if (
        holder.get("released") is not None
        or holder.get("host") != socket.gethostname()
        or type(pid) is not int
        or pid == os.getpid()
        or not 0 < pid < 1 << 22
    ):
        return False
    deadline = time.monotonic() + HOLDER_EXIT_WAIT
    while _alive(pid, holder.get("started")):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int, started: object) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    if stat is None:  # no /proc (then no start time was recorded), or hidden (hidepid: another user's process)
        return started is None
    if started is not None and started != stat[1]:
        return False
    return not _exiting(pid)


PF_EXITING = 0x4  # a task's flag (field 9 of /proc/PID/stat) from the moment it starts to exit


def _exiting(pid: int) -> bool:
    """Whether every thread of ``pid`` is exiting or dead: set before the kernel closes a dying process's files
    (and so releases its flock), so a holder whose teardown is slow (a GPU driver's, seconds) counts as gone. A
    leader that is a zombie while other threads run (its main thread called pthread_exit) is alive."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        fields = _stat_fields(f"/proc/{pid}/task/{task}/stat")
        if fields is not None and fields[0] not in ("Z", "X") and not int(fields[6]) & PF_EXITING:
            return False  # (a thread gone meanwhile is skipped)
    return True


def busy_message(save_dir: str | os.PathLike) -> str:
    return (f"{save_dir} is in use by another run ({describe_holder(save_dir)}). Two writers would delete each "
            "other's checkpoints: wait for that run to end, stop it, or use another --save_dir.")  # fmt: skip


def describe_holder(save_dir: str | os.PathLike) -> str:
    """``host H, pid P, SLURM job J, since <time>`` from the holder record, as far as it is readable."""
    holder = _read_holder(save_dir)
    if holder is None:
        return "holder unknown"
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        task = holder.get("slurm_array_task_id")
        parts.append(f"SLURM job {holder['slurm_job_id']}" + (f" (array task {task})" if task else ""))
    if isinstance(holder.get("since"), (int, float)) and 0 < holder["since"] < 1e11:
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])))
    return ", ".join(str(p)[:200] for p in parts)
