"""The catalog of one save dir: which checkpoints are committed, which verify (files and blobs), which one a run
resumes from, and which may go (retention, unreferenced blobs, stale temporaries). No torch: ``telepathy status``,
``list``, ``verify`` and ``prune`` and the Hugging Face integration use it as it is.

Deleting is the writer's job (the caller holds the lock) and reaches only what telepathy made: committed
``step_N`` directories with a telepathy manifest, blobs in ``blobs/``, and temporaries of other processes.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from telepathy.disk import durable
from telepathy.disk.commit import is_own_temporary
from telepathy.disk.contents import MANIFEST
from telepathy.disk.manifest import CheckpointInvalid, read_manifest, verify_directory
from telepathy.disk.retention import RetentionPolicy
from telepathy.disk.save_dir import BLOBS, LATEST, TEMP_PREFIX, TRASH_PREFIX, CheckpointRef, SaveDir, is_blob_file_name

log = logging.getLogger("telepathy")
_BLOB_TRASH = re.compile(re.escape(TRASH_PREFIX) + r"blobs-\d{1,10}-[0-9a-f]{8}")  # dead blobs, being deleted


class Catalog:
    def __init__(self, save_dir: SaveDir) -> None:
        self.dir = save_dir
        self._manifests: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self.delete: Callable[[Path], None] = _remove_tree  # how a pruned directory, renamed aside, is deleted
        self._trash_queued: set[str] = set()  # blobs/.trash-blobs-* directories handed to self.delete already

    def manifest(self, directory: Path) -> dict[str, Any]:
        """``read_manifest`` of a committed directory, remembered while its manifest file is unchanged (committed
        checkpoints never change; a save reads the kept ones' manifests at every prune)."""
        st = os.stat(directory / MANIFEST, follow_symlinks=False) if (directory / MANIFEST).is_file() else None
        key = (st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else (0, 0, 0)
        cached = self._manifests.get(directory)
        if cached is not None and cached[0] == key and st is not None:
            return cached[1]
        doc = read_manifest(directory)
        self._manifests[directory] = (key, doc)
        return doc

    # --------------------------------------------------------------------------------- verification
    def verify(self, directory: Path) -> dict[str, Any]:
        """Every file against the manifest, and every blob it references; returns the manifest or raises
        :class:`CheckpointInvalid` naming the file and the failed check."""
        doc = verify_directory(directory)
        problem = self.verify_blobs(doc.get("blobs") or {})
        if problem is not None:
            file, _, reason = problem.partition(": ")
            raise CheckpointInvalid(directory, file, reason)
        return doc

    def verify_blobs(self, refs: dict[str, dict[str, Any]]) -> str | None:
        """None when every referenced blob has its recorded size and hash, else which one does not and why. The
        blobs of one pack are hashed in one pass over it, in offset order."""
        by_file: dict[Path, list[tuple[str, dict[str, Any]]]] = {}
        for name, entry in refs.items():
            by_file.setdefault(self.dir.blob_file(name, entry), []).append((name, entry))
        for path, members in by_file.items():
            shown = f"{BLOBS}/{path.parent.name}/{path.name}"
            if self.dir.blobs.is_symlink() or path.is_symlink() or path.parent.is_symlink() or not path.is_file():
                return f"{shown}: missing or not a regular file"
            size = path.stat().st_size
            if members[0][1].get("pack") is None:  # a blob's own file (one name, one file)
                ((name, entry),) = members
                if size != entry["bytes"]:
                    return f"{shown}: size {size}, manifest says {entry['bytes']}"
                if durable.hash_file(path) != entry["stored_xxh3_128"]:
                    return f"{shown}: xxh3_128 does not match the manifest (corrupted)"
                continue
            members.sort(key=lambda member: member[1]["offset"])
            for name, entry in members:
                if entry["offset"] + entry["bytes"] > size:
                    return f"{shown}: {size:,} bytes, but blob {name} ends at byte {entry['offset'] + entry['bytes']:,}"
            digests = durable.hash_ranges(path, [(entry["offset"], entry["bytes"]) for _, entry in members])
            for (name, entry), digest in zip(members, digests):
                if digest != entry["stored_xxh3_128"]:
                    return f"{shown}: blob {name} at offset {entry['offset']:,}: xxh3_128 does not match the manifest"
        return None

    # ---------------------------------------------------------------------------------- choosing one
    def newest_valid(self) -> tuple[CheckpointRef, dict[str, Any]] | None:
        """The newest committed checkpoint that verifies; invalid ones are skipped with a warning naming the file
        and the failed check."""
        pointer = self.dir.latest_target()
        if pointer is not None and not pointer.is_dir():
            log.warning("%s points at %s, which does not exist; scanning checkpoints/", LATEST, pointer)
        return first_valid(reversed(self.dir.committed()), self.verify)

    def valid_newest_first(self) -> Iterator[Path]:
        """Committed checkpoints that verify, newest first (the others skipped with a warning), read lazily: a
        resume that can use the newest never hashes the older ones."""
        pointer = self.dir.latest_target()
        if pointer is not None and not pointer.is_dir():
            log.warning("%s points at %s, which does not exist; scanning checkpoints/", LATEST, pointer)
        for ref in reversed(self.dir.committed()):
            found = first_valid([ref], self.verify)
            if found is not None:
                yield ref.path

    def resume_point(self, resume_from: str | os.PathLike | None = None, strict: bool = False) -> Path | None:
        """The verified checkpoint to resume from (``resume_from`` if given, else the newest that verifies; with
        ``strict`` the newest or an error); None when there is none; CheckpointInvalid when none verifies."""
        committed = self.dir.committed()
        if resume_from is not None:
            self.verify(Path(resume_from))
            return Path(resume_from)
        if strict and committed:
            try:
                self.verify(committed[-1].path)
            except CheckpointInvalid as exc:
                raise CheckpointInvalid(exc.directory, exc.file, f"{exc.reason}; strict resume refuses to fall back "
                                        "to an older checkpoint (check the disk, then resume without "
                                        "--strict_resume to replay from the previous one)") from None  # fmt: skip
            return committed[-1].path
        found = self.newest_valid()
        if found is None and committed:
            newest = committed[-1].path
            raise CheckpointInvalid(newest.parent, newest.name, f"none of the {len(committed)} checkpoints "
                                    "verifies (see the warnings above); starting from scratch would hide that: "
                                    "move them away or use a new --save_dir")  # fmt: skip
        return None if found is None else found[0].path

    # ------------------------------------------------------------------------------------- clean-up
    def remove_stale_temporaries(self) -> None:
        """Temporary directories of other processes' unfinished saves and prunes (the caller is the writer)."""
        for entry in self.dir.temporaries():
            if not is_own_temporary(entry) and entry.is_dir() and not entry.is_symlink():
                log.info("removing stale %s from an interrupted save or prune", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def referenced_blobs(self) -> dict[str, dict[str, Any]] | None:
        """Every blob a committed or emergency checkpoint references, with its manifest entry; None when some
        manifest cannot be read (then nothing may be deleted: it might reference any blob)."""
        found = self._references()
        return None if found is None else found[0]

    def _references(self) -> tuple[dict[str, dict[str, Any]], set[str]] | None:
        """``referenced_blobs()`` and the names of the blob files and packs that any of those references needs
        (a blob written again into a newer pack is still read from the older one by older checkpoints)."""
        live: dict[str, dict[str, Any]] = {}
        files: set[str] = set()
        # Emergency checkpoints first, then committed ones oldest to newest: the entry kept for each blob is the
        # newest committed reference, the one a save should reuse (an older emergency checkpoint's must not keep a
        # retiring pack in use).
        directories = sorted(self.dir.all_checkpoints(), key=lambda d: d.parent != self.dir.emergency)
        for directory in directories:
            try:
                blobs = self.manifest(directory).get("blobs", {})
            except CheckpointInvalid:
                return None
            live.update(blobs)
            files.update(self.dir.blob_file(name, entry).name for name, entry in blobs.items())
        return live, files

    def collect_blobs(self) -> dict[str, dict[str, Any]] | None:
        """Delete blobs no kept checkpoint references, and stale blob temporaries; returns the live blobs (None
        when a manifest is unreadable: then nothing is deleted)."""
        found = self._references()
        if found is None:
            log.error("a checkpoint manifest in %s is unreadable, so no blob can be deleted safely and blobs/ will "
                      "grow; run `python -m telepathy verify %s` and move the damaged checkpoint away",
                      self.dir, self.dir)  # fmt: skip
            return None
        live, live_files = found
        if self.dir.blobs.is_symlink() or not self.dir.blobs.is_dir():
            return live
        own = f"-{os.getpid()}"
        trash: Path | None = None  # dead blobs are renamed into it here and deleted in the background
        for shard in self.dir.blobs.iterdir():
            if shard.is_symlink() or not shard.is_dir():  # never follow a link out of the save dir
                continue
            if _BLOB_TRASH.fullmatch(shard.name):
                # An earlier collection's: queued by this catalog already, or left by a writer that died before
                # its delete finished (by name, not by pid: in a container the next writer often has the same pid).
                if shard.name not in self._trash_queued:
                    self._trash_queued.add(shard.name)
                    self.delete(shard)
                continue
            for path in shard.iterdir():
                stale_tmp = path.name.startswith(TEMP_PREFIX) and not path.name.endswith(own)
                dead = is_blob_file_name(path.name) and path.name not in live_files
                if (stale_tmp or dead) and not path.is_dir():
                    if trash is None:
                        trash = self.dir.blobs / f"{TRASH_PREFIX}blobs-{os.getpid()}-{secrets.token_hex(4)}"
                        trash.mkdir()
                        self._trash_queued.add(trash.name)
                    # A rename, not an unlink: freeing a dense save's worth of blobs costs about as much as writing
                    # them, so that happens off the save's critical path. Renamed, the name is free at once for a
                    # blob that a later save writes again (the background delete can never take the new one).
                    os.rename(path, trash / f"{shard.name}-{path.name}")
        if trash is not None:
            self.delete(trash)
        return live

    def prune(self, retention: RetentionPolicy, dry_run: bool = False, known_good: Path | None = None) -> list[Path]:
        """Apply ``retention``. Deletes only committed ``step_N`` directories with a telepathy manifest, never
        the newest one, the one ``latest`` points at, or the newest one that verifies: ``known_good`` (a save
        passes the checkpoint it just committed) or else found by verifying newest first — a damaged newest
        checkpoint must not be the only one kept. ``dry_run``: only say which."""
        refs = self.dir.committed()
        if not refs:
            return []
        if known_good is None:
            good = first_valid(reversed(refs), self.verify)
            known_good = good[0].path if good is not None else None
        metrics: dict[int, float | None] = {}
        ours: dict[int, Path] = {}
        for ref in refs:
            try:
                manifest = self.manifest(ref.path)
            except CheckpointInvalid:
                continue  # not provably ours (or damaged): never delete it
            metric = manifest.get("metric")
            metrics[ref.step] = float(metric) if isinstance(metric, (int, float)) and _finite(metric) else None
            ours[ref.step] = ref.path
        keep = retention.steps_to_keep(metrics) | {refs[-1].step}
        pointer = self.dir.latest_target()
        removed = []
        for step, path in ours.items():
            if step in keep or path.resolve() == pointer or path == known_good:
                continue
            if not dry_run:
                trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
                os.rename(path, trash)  # no longer a candidate for loading, even if the delete is interrupted
                durable.pause_point("pruned directory renamed aside, before its removal")
                self.delete(trash)  # no fsync: a prune lost in a crash only keeps an old checkpoint a while longer
                self._manifests.pop(path, None)
            removed.append(path)
        return removed


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a leftover .trash- directory is removed by the next writer


class BackgroundDeleter:
    """Deletes pruned directories in a background thread, off the save's critical path (unlinking freshly written
    files costs about as much as writing a small checkpoint). :meth:`drain` waits for what is queued."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Path] = queue.Queue()
        self._thread: threading.Thread | None = None

    def __call__(self, path: Path) -> None:
        self._queue.put(path)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="telepathy-prune", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                path = self._queue.get(timeout=1.0)
            except queue.Empty:
                return
            _remove_tree(path)
            self._queue.task_done()

    def drain(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float (a hostile manifest)
        return False


def first_valid(refs: Iterable[CheckpointRef], verify: Callable[[Path], dict[str, Any]] = verify_directory,
                ) -> tuple[CheckpointRef, dict[str, Any]] | None:  # fmt: skip
    """The first of ``refs`` (newest first) that verifies, with its manifest; the others are skipped with a
    warning naming the file and the failed check (a save interrupted by a kill, a damaged disk)."""
    for ref in refs:
        try:
            return ref, verify(ref.path)
        except CheckpointInvalid as exc:
            log.warning("skipping checkpoint %s: %s: %s; trying the next older one", ref.path, exc.file, exc.reason)
    return None


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Verify one checkpoint directory, its blobs included, wherever it is given from (``SAVE_DIR/latest`` too)."""
    directory = Path(directory)
    return Catalog(SaveDir.of_checkpoint(directory.resolve())).verify(directory)
