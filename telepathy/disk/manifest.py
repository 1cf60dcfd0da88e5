"""The manifest: what a checkpoint directory must contain, byte for byte.

``manifest.json`` lists every file with its size and xxh3-128 hash (xxhash: >5 GB/s, so hashing never
limits a save or a load). A directory is trusted only if every listed file is a regular file inside it with
the listed size and hash. The manifest carries a hash of itself too (``manifest_xxh3_128``, over its canonical
JSON without that field), so a flipped byte in its own metadata is caught as well. A flipped byte, a
truncation, a zero-filled or deleted file is therefore detected and named.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from telepathy.disk.contents import MANIFEST as MANIFEST_NAME
from telepathy.disk.durable import hash_file, write_all  # noqa: F401 (hash_file: re-exported)
from telepathy.disk.save_dir import is_blob_name
from telepathy.errors import CheckpointInvalid  # noqa: F401 (re-exported: raised here)

MANIFEST_FORMAT = "telepathy-checkpoint"
MANIFEST_VERSION = 2  # 2: the manifest hashes itself
SELF_HASH = "manifest_xxh3_128"
HASH_NAME = "xxh3_128"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists files and blobs: far below this
MAX_FILE_BYTES = 1 << 46  # 64 TiB: anything larger in a manifest is corruption or an attack
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")  # the whole name (fullmatch: no trailing newline)


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    digest: str


def entry_for(path: Path) -> FileEntry:
    """The manifest entry of a file already written (and fsynced) by someone else: DCP shards, Trainer files."""
    return FileEntry(path.name, path.stat().st_size, hash_file(path))


def is_safe_file_name(name: str) -> bool:
    """A plain file name inside a checkpoint directory: no separators, no '..', no leading dot."""
    return isinstance(name, str) and bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


class HashingWriter:
    """A write-only file wrapper that hashes what passes through, so a save never reads its files back."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return write_all(self.file, data)

    def flush(self) -> None:
        self.file.flush()

    def entry(self, name: str) -> FileEntry:
        return FileEntry(name, self.size, self.hasher.hexdigest())


def build_manifest(entries: list[FileEntry], info: dict[str, Any]) -> bytes:
    doc = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "hash": HASH_NAME,
        **info,
        "files": {e.name: {"bytes": e.size, HASH_NAME: e.digest} for e in entries},
    }
    doc[SELF_HASH] = self_hash(doc)
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def self_hash(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != SELF_HASH}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, indent=1, sort_keys=True).encode())


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse and sanity-check ``manifest.json`` (not the files it lists). Raises CheckpointInvalid."""
    path = directory / MANIFEST_NAME
    try:
        if path.is_symlink() or not path.is_file():
            raise CheckpointInvalid(directory, MANIFEST_NAME, "missing or not a regular file")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise CheckpointInvalid(directory, MANIFEST_NAME, f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointInvalid(directory, MANIFEST_NAME, f"unreadable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise CheckpointInvalid(directory, MANIFEST_NAME, "not a telepathy checkpoint manifest")
    if doc.get("format_version") != MANIFEST_VERSION:
        raise CheckpointInvalid(
            directory,
            MANIFEST_NAME,
            f"format_version {doc.get('format_version')!r} not readable by this telepathy (reads {MANIFEST_VERSION})",
        )
    if doc.get(SELF_HASH) != self_hash(doc):
        raise CheckpointInvalid(directory, MANIFEST_NAME, f"{SELF_HASH} does not match its content (corrupted)")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointInvalid(directory, MANIFEST_NAME, "lists no files")
    for name, entry in files.items():
        if not is_safe_file_name(name):
            raise CheckpointInvalid(directory, name, "file name would escape the checkpoint directory")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
            raise CheckpointInvalid(directory, name, f"manifest size {size!r} is not a plausible byte count")
        if not isinstance(entry.get(HASH_NAME), str):
            raise CheckpointInvalid(directory, name, f"manifest has no {HASH_NAME} hash")
    for key in ("step", "epoch", "batch_idx"):
        value = doc.get(key)
        if value is not None and (type(value) is not int or not 0 <= value < 1 << 62):
            raise CheckpointInvalid(directory, MANIFEST_NAME, f"{key} {str(value)[:40]!r} is not a plausible count")
    metric = doc.get("metric")
    if metric is not None and not (type(metric) in (int, float) and abs(metric) < 1e300):
        raise CheckpointInvalid(directory, MANIFEST_NAME, f"metric {str(metric)[:40]!r} is not a finite number")
    blobs = doc.get("blobs") or {}
    if not isinstance(blobs, dict):
        raise CheckpointInvalid(directory, MANIFEST_NAME, "blobs is not a mapping")
    for name, entry in blobs.items():
        ok = is_blob_name(name) and isinstance(entry, dict) and entry.get("codec") in ("raw", "zst")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if not ok or type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise CheckpointInvalid(directory, MANIFEST_NAME, f"blob entry {name!r} is malformed")
        if "pack" in entry or "offset" in entry:  # a blob inside a pack: which one, and where
            offset = entry.get("offset")
            if not is_blob_name(entry.get("pack")) or type(offset) is not int or not 0 <= offset <= MAX_FILE_BYTES:
                raise CheckpointInvalid(directory, MANIFEST_NAME, f"blob entry {name!r} has a malformed pack location")
    return doc


def verify_directory(directory: Path) -> dict[str, Any]:
    """Check every file of the directory against the manifest; return the manifest or raise CheckpointInvalid.
    The shared blobs a differential checkpoint references are checked by :class:`telepathy.disk.catalog.Catalog`."""
    doc = read_manifest(directory)
    for name, entry in doc["files"].items():
        path = directory / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise CheckpointInvalid(directory, name, "missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointInvalid(directory, name, "not a regular file (symlink or special file)")
        if st.st_size != entry["bytes"]:
            raise CheckpointInvalid(
                directory, name, f"size {st.st_size} bytes, manifest says {entry['bytes']} (truncated or grown)"
            )
        digest = hash_file(path)
        if digest != entry[HASH_NAME]:
            raise CheckpointInvalid(
                directory, name, f"{HASH_NAME} {digest} does not match manifest {entry[HASH_NAME]} (corrupted)"
            )
    return doc
