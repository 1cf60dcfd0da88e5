"""The checkpoint store: commit protocol, verified loading and pruning for one save directory.

Layout::

    SAVE_DIR/
      latest -> checkpoints/step_00001200     symlink, moved atomically after each commit
      checkpoints/step_00001200/              one directory per committed checkpoint
        encoder.pt adapter_llama.pt ...       named parts (torch.save, loaded with weights_only=True)
        optimizer.pt state.pt manifest.json
      checkpoints/.tmp-step_.../              a save in progress (removed at start-up if stale)
      emergency/step_00001234_<time>/         written after an unexpected exception; never auto-resumed

Commit protocol: write every file into a temporary directory, fsync each file, write the manifest last,
fsync the directory, rename it to ``step_N``, fsync ``checkpoints/``, then repoint ``latest``. The rename is
the commit point: a crash before it leaves only a temporary directory; a crash after it leaves a complete,
verifiable checkpoint. ``latest`` is a convenience for people and tools; loading scans every committed
directory and takes the newest that verifies, so a crash between the rename and the symlink update loses
nothing.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from telepathy.disk import durable
from telepathy.disk.lock import SaveDirLock
from telepathy.disk.manifest import (
    MANIFEST_NAME,
    CheckpointInvalid,
    FileEntry,
    HashingWriter,
    build_manifest,
    is_safe_file_name,
    read_manifest,
    verify_directory,
)
from telepathy.disk.retention import RetentionPolicy
from telepathy.disk.save_dir import (  # noqa: F401 (CHECKPOINTS, EMERGENCY, step_dir_name: re-exported)
    CHECKPOINTS,
    EMERGENCY,
    LATEST,
    CheckpointRef,
    committed_checkpoints,
    latest_pointer,
    step_dir_name,
)
from telepathy.store.blobs import BlobStore
from telepathy.store.save_errors import describe_failure, os_error_in

log = logging.getLogger("telepathy")

_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks to run code (or is otherwise not plain tensors and primitives)."""


class CheckpointWriteError(RuntimeError):
    """A save failed with an I/O error (disk full, EIO, EACCES); nothing of it was committed."""

    def __init__(self, message: str, error: OSError) -> None:
        super().__init__(message)
        self.errno = error.errno


@dataclass
class PendingSave:
    """A checkpoint being written: files go to ``tmp``; :meth:`CheckpointStore.commit` publishes it."""

    step: int
    tmp: Path
    final: Path
    emergency: bool
    entries: list[FileEntry] = field(default_factory=list)
    blob_refs: dict[str, dict[str, Any]] = field(default_factory=dict)


class CheckpointStore:
    """Durable, verified checkpoints for one save directory."""

    def __init__(self, save_dir: str | os.PathLike, retention: RetentionPolicy | None = None, *,
                 differential: bool = False, compress: bool = False) -> None:  # fmt: skip
        self.save_dir = Path(save_dir)
        self.blobs = BlobStore(save_dir, compress=compress) if (differential or compress) else None
        self.checkpoints_dir = self.save_dir / CHECKPOINTS
        self.emergency_dir = self.save_dir / EMERGENCY
        self.retention = retention or RetentionPolicy()
        self.lock = SaveDirLock(self.save_dir)

    def close(self) -> None:
        """Stop being this save dir's writer (also happens when the process exits)."""
        self.lock.release()

    # ----------------------------------------------------------------------------------------- set-up
    def prepare(self) -> None:
        """Create the layout, check it is writable, become its only writer (:class:`SaveDirBusy` otherwise),
        remove stale temporary directories of earlier runs."""
        if self.save_dir.exists() and not self.save_dir.is_dir():
            raise NotADirectoryError(f"save dir {self.save_dir} exists and is not a directory; pick another path")
        durable.make_dirs(self.checkpoints_dir)
        if not os.access(self.checkpoints_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"save dir {self.checkpoints_dir} is not writable by this user")
        self.lock.acquire()  # one writer per save dir; the clean-up below is safe only for the writer
        for parent in (self.checkpoints_dir, self.emergency_dir):
            if parent.is_dir():
                self._remove_stale(parent)

    def _remove_stale(self, parent: Path) -> None:
        own = f"-{os.getpid()}-"
        for entry in parent.iterdir():
            name = entry.name
            if (name.startswith(_TEMP_PREFIX) or name.startswith(_TRASH_PREFIX)) and own not in name:
                log.info("removing stale %s from an interrupted save or prune", entry)
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        files: Mapping[str, Any],
        info: Mapping[str, Any],
        *,
        emergency: bool = False,
    ) -> Path:
        """Write ``files`` (name -> object for ``torch.save``, written in the given order as ``name.pt``)
        and commit them as the checkpoint for ``step``. Returns the committed directory."""
        pending = self.begin(step, emergency=emergency)
        try:
            self.write_parts(pending, files)
            return self.commit(pending, info)
        except BaseException as exc:
            error = self.abort(pending, exc, files)
            if error is exc:
                raise
            raise error from exc

    def begin(self, step: int, *, emergency: bool = False) -> PendingSave:
        """Start a checkpoint: an empty temporary directory that nothing loads until :meth:`commit`. The steps
        are public so that several ranks can write into one checkpoint (``telepathy.store.collective``)."""
        parent = self.emergency_dir if emergency else self.checkpoints_dir
        durable.make_dirs(parent)
        final_name = step_dir_name(step) + (f"_{int(time.time())}" if emergency else "")
        if emergency and (parent / final_name).exists():  # a second emergency in the same second
            final_name += f"_{secrets.token_hex(2)}"
        tmp = parent / f"{_TEMP_PREFIX}{final_name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        return PendingSave(step, tmp, parent / final_name, emergency)

    def write_parts(self, pending: PendingSave, files: Mapping[str, Any]) -> None:
        """Write ``name.pt`` for each entry durably into the pending checkpoint (large tensors to shared blobs
        in differential or compressed mode)."""
        for name in files:
            if not is_safe_file_name(f"{name}.pt"):
                raise ValueError(f"checkpoint part name {name!r} is not a plain file name")
        if self.blobs is not None:  # large tensors to content-addressed blobs, written only when new
            if not self.blobs.known:  # first save of this process: learn what the kept checkpoints hold
                self.blobs.known = self._referenced_blobs() or {}
            files = {name: self.blobs.externalize(obj, pending.blob_refs) for name, obj in files.items()}
        pending.entries += [write_part(pending.tmp / f"{name}.pt", obj) for name, obj in files.items()]

    def commit(self, pending: PendingSave, info: Mapping[str, Any], more: Sequence[FileEntry] = ()) -> Path:
        """Write the manifest (the pending files plus ``more``, written by other ranks) and publish the
        directory by rename; then move ``latest``, prune and collect unreferenced blobs."""
        extra = {"blobs": pending.blob_refs} if pending.blob_refs else {}
        manifest = build_manifest([*pending.entries, *more],
                                  {**info, "step": pending.step, "emergency": pending.emergency, **extra})  # fmt: skip
        durable.write_file_durably(pending.tmp / MANIFEST_NAME, lambda f: f.write(manifest))
        final = pending.final
        if final.exists() and not pending.emergency:
            return self._resolve_existing(pending.tmp, final)
        durable.publish_directory(pending.tmp, final)
        if not pending.emergency:
            try:
                durable.atomic_symlink(self.save_dir / LATEST, f"{CHECKPOINTS}/{final.name}")
                self.prune()  # and the blobs only pruned checkpoints referenced
            except OSError as exc:  # the commit stands: loading scans checkpoints/, not the symlink
                log.warning("checkpoint %s is committed, but updating %s or pruning failed (%s); loading will "
                            "still find it", final, LATEST, exc)  # fmt: skip
        return final

    def abort(self, pending: PendingSave, exc: BaseException, files: Mapping[str, Any] | None = None) -> BaseException:
        """Remove what an unfinished save wrote; return the error to raise: a :class:`CheckpointWriteError`
        (with the space needed) for an I/O error, ``exc`` itself otherwise."""
        shutil.rmtree(pending.tmp, ignore_errors=True)
        io_error = os_error_in(exc)
        if io_error is None:
            return exc
        return CheckpointWriteError(
            describe_failure(self.save_dir, pending.step, io_error, files or {}, self.latest_pointer()), io_error
        )

    def _resolve_existing(self, tmp: Path, final: Path) -> Path:
        """A checkpoint for this step is already committed (e.g. a replay after a crash): keep a valid one,
        set an invalid one aside (renamed, never deleted) and publish ours."""
        try:
            verify_directory(final)
            log.info("checkpoint %s already committed and valid; keeping it", final)
            shutil.rmtree(tmp, ignore_errors=True)
        except CheckpointInvalid as exc:
            aside = final.with_name(f".invalid-{final.name}-{int(time.time())}")
            log.warning("existing %s is invalid (%s); moving it to %s and committing a new one", final, exc, aside)
            os.rename(final, aside)
            durable.publish_directory(tmp, final)
        durable.atomic_symlink(self.save_dir / LATEST, f"{CHECKPOINTS}/{final.name}")
        return final

    # ---------------------------------------------------------------------------------------- listing
    def committed(self) -> list[CheckpointRef]:
        """Committed checkpoint directories, oldest first (not yet verified)."""
        return committed_checkpoints(self.save_dir)

    def latest_pointer(self) -> Path | None:
        """Where ``SAVE_DIR/latest`` points, or None when it does not exist."""
        return latest_pointer(self.save_dir)

    def newest_valid(self) -> tuple[CheckpointRef, dict[str, Any]] | None:
        """The newest checkpoint that verifies against its manifest; invalid ones are skipped with a
        warning naming the file and the failed check."""
        pointer = self.latest_pointer()
        if pointer is not None and not pointer.is_dir():
            log.warning("%s points at %s, which does not exist; scanning checkpoints/", LATEST, pointer)
        for ref in reversed(self.committed()):
            try:
                return ref, verify_directory(ref.path)
            except CheckpointInvalid as exc:
                log.warning("skipping checkpoint %s: %s: %s; trying the next older one", ref.path, exc.file, exc.reason)
        return None

    def resume_point(self, resume_from: str | os.PathLike | None = None, strict: bool = False) -> Path | None:
        """The verified checkpoint to resume from (``resume_from`` if given, else the newest that verifies; with
        ``strict`` the newest or an error), None when there is none; CheckpointInvalid when none verifies."""
        committed = self.committed()  # listed once: the checks below all read it
        if resume_from is not None:
            directory = Path(resume_from)
            verify_directory(directory)
        elif strict and committed:
            directory = committed[-1].path
            try:
                verify_directory(directory)
            except CheckpointInvalid as exc:
                raise CheckpointInvalid(
                    exc.directory,
                    exc.file,
                    f"{exc.reason}; strict resume refuses to fall back to an older "
                    "checkpoint (check the disk, then resume without --strict_resume to replay from the previous one)",
                ) from None
        else:
            found = self.newest_valid()
            if found is None and committed:
                newest = committed[-1].path
                raise CheckpointInvalid(newest.parent, newest.name, f"none of the {len(committed)} "
                                        "checkpoints verifies (see the warnings above); starting from scratch "
                                        "would hide that: move them away or use a new --save_dir")  # fmt: skip
            if found is None:
                return None
            directory = found[0].path
        return directory

    # ---------------------------------------------------------------------------------------- loading
    @staticmethod
    def load_part(directory: Path, name: str) -> Any:
        """Load ``name.pt`` from a verified checkpoint directory without executing code from it (tensors kept
        in blobs by a differential or compressed save are read back in place of their references)."""
        path = directory / f"{name}.pt"
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no second copy in RAM
            refs = read_manifest(directory).get("blobs")
            return BlobStore(directory.parent.parent).internalize(obj, refs) if refs else obj
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{path} is not a safe checkpoint file: it contains objects other than tensors and plain "
                f"data, which could run code when loaded; refusing to load it ({str(exc).splitlines()[0]})"
            ) from None

    # ---------------------------------------------------------------------------------------- pruning
    def _referenced_blobs(self) -> dict[str, dict[str, Any]] | None:
        """Every blob that a committed or emergency checkpoint references, with its manifest entry; None when
        some manifest cannot be read (then nothing may be deleted: it might reference any blob)."""
        directories = [r.path for r in self.committed()]
        if self.emergency_dir.is_dir():
            directories += [p for p in self.emergency_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        live: dict[str, dict[str, Any]] = {}
        for directory in directories:
            try:
                live.update(read_manifest(directory).get("blobs", {}))
            except CheckpointInvalid:
                return None
        return live

    def _collect_blobs(self) -> None:
        if self.blobs is None:
            return
        live = self._referenced_blobs()
        if live is None:
            log.error("a checkpoint manifest in %s is unreadable, so no blob can be deleted safely and blobs/ "
                      "will grow; run `python -m telepathy verify %s` and move the damaged checkpoint away",
                      self.save_dir, self.save_dir)  # fmt: skip
            return
        self.blobs.known = live
        self.blobs.collect_garbage(live)

    def prune(self, dry_run: bool = False) -> list[Path]:
        """Apply the retention policy. Deletes only committed ``step_N`` directories with a telepathy
        manifest, never the newest one or the one ``latest`` points at. ``dry_run``: only say which."""
        refs = self.committed()
        if not refs:
            return []
        metrics: dict[int, float | None] = {}
        ours: dict[int, Path] = {}
        for ref in refs:
            try:
                manifest = read_manifest(ref.path)
            except CheckpointInvalid:
                continue  # not provably ours (or damaged): never delete it
            metric = manifest.get("metric")
            metrics[ref.step] = float(metric) if isinstance(metric, (int, float)) else None
            ours[ref.step] = ref.path
        keep = self.retention.steps_to_keep(metrics) | {refs[-1].step}
        pointer = self.latest_pointer()
        removed = []
        for step, path in ours.items():
            if step in keep or path.resolve() == pointer:
                continue
            if dry_run:
                removed.append(path)
                continue
            trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(path, trash)  # no longer a candidate for loading, even if the delete is interrupted
            durable.pause_point("pruned directory renamed aside, before its removal")
            durable.fsync_dir(path.parent)
            shutil.rmtree(trash)
            removed.append(path)
        if not dry_run:
            self._collect_blobs()
        return removed


def write_part(path: Path, obj: Any) -> FileEntry:
    """``torch.save`` one part durably, hashing its bytes on their way to disk (no read-back)."""
    writer: HashingWriter | None = None

    def write(f: Any) -> None:
        nonlocal writer
        writer = HashingWriter(f)
        torch.save(obj, writer)

    durable.write_file_durably(path, write)
    assert writer is not None
    return writer.entry(path.name)
