"""The commit: a checkpoint becomes visible all at once or not at all (orbax's ``TemporaryPath`` is the model).

    pending = PendingCheckpoint.create(save_dir, step)     an empty temporary directory nothing loads
    pending.write_file("model.pt", write)                   each file hashed on its way to disk and fsynced
    pending.finalize(info)                                  manifest last, fsync, rename to step_N, fsync, latest
    pending.abort()                                         instead, on any failure: the temporary goes

The rename is the commit point: a crash before it leaves only a temporary directory (recognised by
:func:`telepathy.disk.save_dir.is_temporary` and removed by the next writer); a crash after it leaves a complete,
verifiable checkpoint. ``latest`` is a convenience for people and tools, moved after the rename; loading scans
``checkpoints/``, so a crash between the two loses nothing. Used alike by the single-process store and by the
all-ranks commit (:mod:`telepathy.store.collective`). No torch here: callers pass a function that writes bytes.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from telepathy.disk import durable
from telepathy.disk.manifest import (
    MANIFEST_NAME,
    CheckpointInvalid,
    FileEntry,
    HashingWriter,
    build_manifest,
    is_safe_file_name,
    verify_directory,
)
from telepathy.disk.save_dir import CHECKPOINTS, INVALID_PREFIX, TEMP_PREFIX, SaveDir, step_dir_name

log = logging.getLogger("telepathy")


@dataclass
class PendingCheckpoint:
    """A checkpoint being written into ``tmp``; :meth:`finalize` publishes it as ``final``."""

    save_dir: SaveDir
    step: int
    tmp: Path
    final: Path
    emergency: bool
    entries: list[FileEntry] = field(default_factory=list)
    blob_refs: dict[str, dict[str, Any]] = field(default_factory=dict)
    replaces_unusable: bool = False  # a committed ``final`` verifies but a resume could not use it: replace it

    @classmethod
    def create(cls, save_dir: SaveDir, step: int, *, emergency: bool = False) -> PendingCheckpoint:
        """An empty temporary directory, named so that its owner (host, pid) and its target are readable."""
        parent = save_dir.emergency if emergency else save_dir.checkpoints
        durable.make_dirs(parent)
        final_name = step_dir_name(step) + (f"_{int(time.time())}" if emergency else "")
        if emergency and (parent / final_name).exists():  # a second emergency in the same second
            final_name += f"_{secrets.token_hex(2)}"
        tmp = parent / f"{TEMP_PREFIX}{final_name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        return cls(save_dir, step, tmp, parent / final_name, emergency)

    @classmethod
    def join(cls, save_dir: SaveDir, step: int, tmp: Path) -> PendingCheckpoint:
        """Another rank's view of a pending checkpoint that rank 0 created: it writes files, never commits."""
        return cls(save_dir, step, tmp, tmp, False)

    def write_file(self, name: str, write: Callable[[BinaryIO], None]) -> FileEntry:
        """Create ``name`` in the checkpoint, let ``write`` fill it, fsync it; its size and hash are recorded
        for the manifest from the bytes as they pass (no read-back)."""
        if not is_safe_file_name(name):
            raise ValueError(f"checkpoint file name {name!r} is not a plain file name")
        writer: HashingWriter | None = None

        def hashed(f: BinaryIO) -> None:
            nonlocal writer
            writer = HashingWriter(f)
            write(writer)  # type: ignore[arg-type]

        durable.write_file_durably(self.tmp / name, hashed)
        assert writer is not None
        entry = writer.entry(name)
        self.entries.append(entry)
        return entry

    def finalize(self, info: Mapping[str, Any], more: Sequence[FileEntry] = ()) -> Path:
        """Write the manifest (this checkpoint's files plus ``more``, written by other ranks), publish the
        directory by rename and move ``latest`` to it. Returns the committed directory."""
        extra = {"blobs": self.blob_refs} if self.blob_refs else {}
        manifest = build_manifest([*self.entries, *more],
                                  {**info, "step": self.step, "emergency": self.emergency, **extra})  # fmt: skip
        durable.write_file_durably(self.tmp / MANIFEST_NAME, lambda f: f.write(manifest))
        if self.final.exists() and not self.emergency:
            self._resolve_existing()
        else:
            durable.publish_directory(self.tmp, self.final)
        if not self.emergency:
            try:
                durable.atomic_symlink(self.save_dir.latest, f"{CHECKPOINTS}/{self.final.name}")
            except OSError as exc:  # the commit stands: loading scans checkpoints/, not the symlink
                log.warning("checkpoint %s is committed, but moving %s failed (%s); loading will still find it",
                            self.final, self.save_dir.latest, exc)  # fmt: skip
        return self.final

    def abort(self) -> None:
        """Remove what this unfinished checkpoint wrote (only its own temporary directory)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _resolve_existing(self) -> None:
        """A checkpoint for this step is already committed (a replay after a crash): keep a valid one, set an
        invalid one aside (renamed, never deleted) and publish ours."""
        try:
            if self.replaces_unusable:
                raise CheckpointInvalid(self.final, "", "it verifies, but this run could not resume from it")
            verify_directory(self.final)
            log.info("checkpoint %s already committed and valid; keeping it", self.final)
            self.abort()
        except CheckpointInvalid as exc:
            aside = self.final.with_name(f"{INVALID_PREFIX}{self.final.name}-{int(time.time())}")
            while aside.exists():
                aside = aside.with_name(f"{aside.name}-{secrets.token_hex(2)}")
            log.warning("existing %s is invalid (%s); moving it to %s and committing a new one", self.final, exc, aside)
            os.rename(self.final, aside)
            durable.publish_directory(self.tmp, self.final)


def is_own_temporary(path: Path) -> bool:
    """Whether a temporary (save or prune) was made by this process (its pid in the name): never stale for it."""
    return f"-{os.getpid()}-" in path.name
