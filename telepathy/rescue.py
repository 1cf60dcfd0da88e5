"""The supervisor's rescue commit: the trainer died without warning (SIGKILL, the OOM killer, a segfault, an
exception, a grace period overrun), and its last complete step is still in shared memory.

With ``snapshot_every_step`` the trainer copies its state into one of two slots at every step boundary
(:mod:`telepathy.disk.slots`). The slots outlive the trainer; the supervisor reads the newest complete one and,
if it is newer than every committed checkpoint, commits it with the normal atomic protocol (temporary directory,
fsync, manifest, rename), reason ``rescue:<how it died>``. The restarted trainer resumes from it bit-identically:
at most the step in flight is lost. A supervisor killed during the rescue leaves only a temporary directory.
torch is imported here only when there is something to rescue, so the supervisor stays light otherwise.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from telepathy.disk.save_dir import SaveDir
from telepathy.disk.slots import read_newest
from telepathy.errors import SaveDirBusy
from telepathy.options import CheckpointOptions

log = logging.getLogger("telepathy")


def how_it_ended(returncode: int) -> str:
    """``SIGKILL`` for a process killed by a signal, ``exit 1`` otherwise."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def rescue(slot_dir: Path, save_dir: Path, how: str, lock_wait: float = 30.0) -> tuple[int, Path] | None:
    """Commit the newest complete snapshot in ``slot_dir`` if it is newer than every committed checkpoint; returns
    (step, committed directory), or None when there is nothing newer to save."""
    found = read_newest(slot_dir)
    if found is None:
        return None
    meta, data = found
    step = int(meta["step"])
    save_dir = Path(meta.get("save_dir") or save_dir)  # where the trainer's Checkpointer writes
    committed = SaveDir(save_dir).committed()
    if committed and committed[-1].step >= step:
        return None  # the trainer committed this step (or a later one) itself
    from telepathy.store.checkpoint_store import CheckpointStore  # noqa: PLC0415 (torch, only for a rescue)
    from telepathy.store.snapshot_read import SnapshotInvalid, files_from_slot  # noqa: PLC0415

    try:  # everything checked before anything is written
        files = files_from_slot(meta, data)
        options = CheckpointOptions(**meta["store"])
        info = {**meta["info"], "reason": f"rescue:{how}"}
    except (SnapshotInvalid, KeyError, TypeError, ValueError, RuntimeError, MemoryError, RecursionError) as exc:
        raise SnapshotInvalid(f"the trainer's step-{step} snapshot does not describe a state it could have "
                              f"written ({exc}); nothing committed from it") from None  # fmt: skip
    store = CheckpointStore(save_dir, options.retention(), differential=options.uses_blobs,
                            compress=options.format == "compressed")  # fmt: skip
    deadline = time.monotonic() + lock_wait
    while True:  # the dead trainer's DataLoader workers may hold its lock for a moment longer
        try:
            store.prepare()
            break
        except SaveDirBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        path = store.save(step, files, info)
    finally:
        store.close()
    return step, path
