"""One writer per save directory.

Two processes saving into one directory (a misconfigured job array, a requeued job overlapping a straggler)
would prune and clean up each other's files. The writer holds an exclusive ``flock`` (via the ``filelock``
package) on ``SAVE_DIR/.telepathy.lock`` for as long as it lives and records who it is in
``SAVE_DIR/.telepathy.lock.json``; a second writer is refused at once with a message naming the holder.

The kernel releases a ``flock`` when its holder dies (SIGKILL, OOM), so a dead holder's lock is taken over
without any staleness guesswork. On NFS, Linux maps ``flock`` to NFS byte-range locks, which the server
releases when the client's lease expires (about 90 s after a node is lost); on filesystems without working
locks ``filelock`` falls back to a lock file that does not detect dead holders.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from telepathy.disk import durable
from telepathy.disk.save_dir import LOCK as LOCK_NAME  # noqa: F401 (re-exported)
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import SaveDirBusy  # noqa: F401 (re-exported: raised here)


class SaveDirLock:
    """Exclusive, per-process-reentrant writer lock on a save directory (held until :meth:`release` or exit)."""

    def __init__(self, save_dir: str | os.PathLike) -> None:
        self.save_dir = Path(save_dir)
        self._lock = FileLock(SaveDir(save_dir).lock_file, timeout=0, thread_local=False, is_singleton=True)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> None:
        """Take the lock or raise :class:`SaveDirBusy` naming the current holder."""
        try:
            self._lock.acquire()
        except Timeout:
            raise SaveDirBusy(busy_message(self.save_dir)) from None
        if self._lock.lock_counter == 1:  # first acquisition in this process: say who holds it
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 3),
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                      "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}  # fmt: skip
            durable.atomic_write_bytes(SaveDir(self.save_dir).holder_file, json.dumps(holder).encode())

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


def busy_message(save_dir: str | os.PathLike) -> str:
    return (f"{save_dir} is in use by another run ({describe_holder(save_dir)}). Two writers would delete each "
            "other's checkpoints: wait for that run to end, stop it, or use another --save_dir.")  # fmt: skip


def describe_holder(save_dir: str | os.PathLike) -> str:
    """``host H, pid P, SLURM job J, since <time>`` from the holder record, as far as it is readable."""
    try:
        holder = json.loads(SaveDir(save_dir).holder_file.read_text())
    except (OSError, ValueError):
        return "holder unknown"
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        task = holder.get("slurm_array_task_id")
        parts.append(f"SLURM job {holder['slurm_job_id']}" + (f" (array task {task})" if task else ""))
    if isinstance(holder.get("since"), (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])))
    return ", ".join(parts)
