"""How training state becomes checkpoint files and comes back, without ever running code from a file.

A part is written with ``torch.save`` (through the commit's hashing writer) and read with
``torch.load(weights_only=True, mmap=True)``: tensors and plain containers only, no second copy in RAM. Tensors that
a differential or compressed save moved to shared blobs (:mod:`telepathy.store.blobs`) are read back in place of
their references.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from telepathy.disk.commit import PendingCheckpoint
from telepathy.disk.contents import part_file
from telepathy.disk.manifest import FileEntry, read_manifest
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import UnsafeCheckpointError


def write_part(pending: PendingCheckpoint, name: str, obj: Any) -> FileEntry:
    """``torch.save`` one part durably into a pending checkpoint, hashing its bytes on their way to disk."""
    return pending.write_file(part_file(name), lambda f: torch.save(obj, f))


def load_part(directory: Path, name: str) -> Any:
    """Load ``<name>.pt`` from a verified checkpoint directory without executing code from it (tensors kept in
    blobs by a differential or compressed save are read back in place of their references)."""
    path = directory / part_file(name)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} is not a safe checkpoint file: it contains objects other than tensors and plain data, which "
            f"could run code when loaded; refusing to load it ({str(exc).splitlines()[0]})",
            directory,
            part_file(name),
        ) from None
    refs = read_manifest(directory).get("blobs")
    if not refs:
        return obj
    from telepathy.store.blobs import BlobStore  # noqa: PLC0415 (only differential checkpoints need it)

    return BlobStore(SaveDir.of_checkpoint(directory.resolve())).internalize(obj, refs)
