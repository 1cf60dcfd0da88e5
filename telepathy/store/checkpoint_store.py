"""The checkpoint store of one save dir: the commit (:mod:`telepathy.disk.commit`), the part formats
(:mod:`.formats`, :mod:`.blobs`) and the catalog (:mod:`telepathy.disk.catalog`) behind one object, with the writer
lock that makes it the only one deleting anything there.

    store = CheckpointStore(save_dir, RetentionPolicy(keep_last=3))
    store.prepare()                                   lock, layout, stale temporaries removed
    path = store.save(step, {"model": sd, ...}, info) commit (atomic), then retention and blob GC
    store.resume_point() / store.load_part(path, "model")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from telepathy.disk import durable
from telepathy.disk.catalog import BackgroundDeleter, Catalog
from telepathy.disk.commit import PendingCheckpoint
from telepathy.disk.lock import SaveDirLock
from telepathy.disk.manifest import FileEntry
from telepathy.disk.retention import RetentionPolicy
from telepathy.disk.save_dir import CheckpointRef, SaveDir
from telepathy.errors import CheckpointWriteError, UnsafeCheckpointError, UsageError  # noqa: F401 (re-exported)
from telepathy.options import unreadable_by_torch
from telepathy.store import formats
from telepathy.store.save_errors import describe_failure, os_error_in

log = logging.getLogger("telepathy")

PendingSave = PendingCheckpoint  # the name collective code and tests know


class CheckpointStore:
    """Durable, verified checkpoints for one save directory."""

    def __init__(self, save_dir: str | os.PathLike, retention: RetentionPolicy | None = None, *,
                 differential: bool = False, compress: bool = False) -> None:  # fmt: skip
        self.dir = SaveDir(save_dir)
        self.save_dir = self.dir.root
        self.checkpoints_dir = self.dir.checkpoints
        self.catalog = Catalog(self.dir)
        self._deleter = BackgroundDeleter()
        self.catalog.delete = self._deleter  # pruned checkpoints are deleted off the save's critical path
        self.retention = retention or RetentionPolicy()
        self.lock = SaveDirLock(self.dir.root)
        self.blobs = None
        self.unusable: set[Path] = set()  # checkpoints a resume skipped although they verify: a save replaces them
        if differential or compress:
            from telepathy.store.blobs import BlobStore  # noqa: PLC0415 (zstd, numpy: only these formats)

            self.blobs = BlobStore(self.dir, compress=compress)

    def close(self) -> None:
        """Finish deleting pruned checkpoints, then stop being this save dir's writer (a process's lock also ends
        when it exits)."""
        self._deleter.drain()
        self.lock.release()

    def prepare(self) -> None:
        """Create the layout, check it is writable, become its only writer (:class:`SaveDirBusy` otherwise),
        remove stale temporaries of earlier runs."""
        problem = unreadable_by_torch(self.save_dir.absolute())  # (a UTF-8 link to such a place works)
        if problem:
            raise UsageError(problem)
        if self.save_dir.exists() and not self.save_dir.is_dir():
            raise NotADirectoryError(f"save dir {self.save_dir} exists and is not a directory; pick another path")
        problems = self.dir.layout_problems()
        if problems:
            raise UsageError("; ".join(problems))
        durable.make_dirs(self.dir.checkpoints)
        if not os.access(self.dir.checkpoints, os.W_OK | os.X_OK):
            raise PermissionError(f"save dir {self.dir.checkpoints} is not writable by this user")
        self.lock.acquire()  # one writer per save dir; the clean-up below is safe only for the writer
        self.catalog.remove_stale_temporaries()
        if self.dir.latest_is_a_copy():  # set aside, never deleted: it is someone's copy of a checkpoint
            aside = self.dir.place_for_latest_copy()
            log.warning("%s is not the symlink telepathy keeps (a copy by a tool that follows links, or a file of "
                        "someone's); moving it to %s", self.dir.latest, aside)  # fmt: skip
            os.rename(self.dir.latest, aside)

    # ------------------------------------------------------------------------------------------- save
    def save(self, step: int, files: Mapping[str, Any], info: Mapping[str, Any], *, emergency: bool = False) -> Path:
        """Write ``files`` (part name -> object for ``torch.save``, in the given order) and commit them as the
        checkpoint for ``step``. Returns the committed directory."""
        try:
            pending = self.begin(step, emergency=emergency)
        except OSError as exc:  # not even the temporary directory: a full disk, a read-only one
            message = describe_failure(self.save_dir, step, exc, files, self.latest_pointer())
            raise CheckpointWriteError(message, exc) from exc
        try:
            self.write_parts(pending, files)
            return self.commit(pending, info)
        except BaseException as exc:
            error = self.abort(pending, exc, files)
            if error is exc:
                raise
            raise error from exc

    def begin(self, step: int, *, emergency: bool = False) -> PendingCheckpoint:
        """Start a checkpoint: an empty temporary directory that nothing loads until :meth:`commit`."""
        pending = PendingCheckpoint.create(self.dir, step, emergency=emergency)
        pending.replaces_unusable = pending.final in self.unusable
        return pending

    def write_parts(self, pending: PendingCheckpoint, files: Mapping[str, Any]) -> None:
        """Write each part durably into the pending checkpoint (large tensors to shared blobs in differential or
        compressed mode)."""
        if self.blobs is not None:  # large tensors to content-addressed blobs, written only when new
            if not self.blobs.known:  # first save of this process: learn what the kept checkpoints hold
                self.blobs.learn(self.catalog.referenced_blobs() or {})
            files = self.blobs.externalize(dict(files), pending.blob_refs)  # all parts at once: one pack
        for name, obj in files.items():
            formats.write_part(pending, name, obj)

    def commit(self, pending: PendingCheckpoint, info: Mapping[str, Any], more: Sequence[FileEntry] = ()) -> Path:
        """Publish the pending checkpoint (plus ``more`` files written by other ranks), then apply retention."""
        self.lock.check_still_held()  # a deleted or replaced lock file: another run may write here now
        final = pending.finalize(info, more)
        if not pending.emergency:
            try:
                self.prune(known_good=final)
            except OSError as exc:  # the commit stands; the next save prunes again
                log.warning("checkpoint %s is committed, but pruning failed (%s)", final, exc)
        return final

    def abort(
        self, pending: PendingCheckpoint, exc: BaseException, files: Mapping[str, Any] | None = None
    ) -> BaseException:
        """Remove what an unfinished save wrote; return the error to raise: a :class:`CheckpointWriteError`
        (with the space needed) for an I/O error, ``exc`` itself otherwise."""
        pending.abort()
        io_error = os_error_in(exc)
        if io_error is None:
            return exc
        message = describe_failure(self.save_dir, pending.step, io_error, files or {}, self.latest_pointer())
        return CheckpointWriteError(message, io_error)

    # ---------------------------------------------------------------------------------- the catalog
    def committed(self) -> list[CheckpointRef]:
        return self.dir.committed()

    def latest_pointer(self) -> Path | None:
        return self.dir.latest_target()

    def newest_valid(self) -> tuple[CheckpointRef, dict[str, Any]] | None:
        return self.catalog.newest_valid()

    def resume_point(self, resume_from: str | os.PathLike | None = None, strict: bool = False) -> Path | None:
        return self.catalog.resume_point(resume_from, strict)

    load_part = staticmethod(formats.load_part)

    def prune(self, dry_run: bool = False, known_good: Path | None = None) -> list[Path]:
        """Apply the retention policy (``known_good``: a checkpoint just committed, kept without verifying it),
        then delete the blobs only pruned checkpoints referenced."""
        removed = self.catalog.prune(self.retention, dry_run, known_good)
        if not dry_run and self.blobs is not None:
            live = self.catalog.collect_blobs()
            if live is not None:
                self.blobs.learn(live)
        return removed
