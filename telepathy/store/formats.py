"""How training state becomes checkpoint files and comes back, without ever running code from a file.

A part is written with ``torch.save`` (through the commit's hashing writer) and read with
``torch.load(weights_only=True, mmap=True)``: tensors and plain containers only, no second copy in RAM. Tensors that
a differential or compressed save moved to shared blobs (:mod:`telepathy.store.blobs`) are read back in place of
their references.
"""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path
from typing import Any

import torch

from telepathy import tree
from telepathy.disk.commit import PendingCheckpoint
from telepathy.disk.contents import part_file
from telepathy.disk.manifest import FileEntry, read_manifest
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import CheckpointInvalid, UnsafeCheckpointError, UsageError


def write_part(pending: PendingCheckpoint, name: str, obj: Any) -> FileEntry:
    """``torch.save`` one part durably into a pending checkpoint, hashing its bytes on their way to disk; then
    make sure a resume can load it (``weights_only``; tensors are mapped, not read), or it is never committed: a
    part holding an object (a defaultdict, a NumPy value, a class) would be a checkpoint no run can resume."""
    entry = pending.write_file(part_file(name), lambda f: torch.save(obj, f))
    if _plainly_loadable(obj):  # (the usual state: the load below costs ~60 us a tensor, more than a small commit)
        return entry
    try:
        torch.load(pending.tmp / part_file(name), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        why = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise UsageError(f"part {name!r} holds something a checkpoint cannot load back (it loads with "
                         f"weights_only=True, never running code): {why[:200]}; store tensors, plain values and "
                         "dict, list, tuple, set, Counter or OrderedDict") from None  # fmt: skip
    return entry


_PLAIN_LEAVES = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device})


def _plainly_loadable(obj: Any) -> bool:
    """Whether ``obj`` holds only kinds ``torch.load(weights_only=True)`` always reads back (plain containers and
    values, dense tensors and parameters): then a saved part needs no trial load. Anything else is tried."""
    pending, seen = [obj], 0
    while pending:
        value = pending.pop()
        kind = type(value)
        seen += 1
        if kind in _PLAIN_LEAVES:
            continue
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            if value.layout != torch.strided or value.is_quantized:
                return False
        elif tree.is_kept_kind(kind) and seen < MAX_NODES:
            pending.extend(value.items() if isinstance(value, dict) else value)
        else:
            return False
    return True


def load_part(directory: Path, name: str) -> Any:
    """Load ``<name>.pt`` from a verified checkpoint directory without executing code from it (tensors kept in
    blobs by a differential or compressed save are read back in place of their references). Only a regular file
    the manifest lists is read, and what it holds must be a plausible state: a bounded structure whose tensors lie
    inside their storage."""
    file = part_file(name)
    manifest = read_manifest(directory)
    path = directory / file
    if file not in manifest["files"]:
        raise CheckpointInvalid(directory, file, "not listed in the manifest; only listed files are read")
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise CheckpointInvalid(directory, file, "not a regular file (symlink or special file)")
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} is not a safe checkpoint file: it contains objects other than tensors and plain data, which "
            f"could run code when loaded; refusing to load it ({str(exc).splitlines()[0]})",
            directory,
            file,
        ) from None
    except OSError as exc:
        raise CheckpointInvalid(directory, file, f"unreadable: {exc}") from None
    except (RuntimeError, ValueError, TypeError, KeyError, EOFError, RecursionError) as exc:  # a lie in its structure
        raise UnsafeCheckpointError(f"{path} does not load as a plausible checkpoint file: {exc!r}"[:500], directory,
                                    file) from None  # fmt: skip
    check_plausible(obj, directory, file)
    refs = manifest.get("blobs")
    if not refs:
        return obj
    from telepathy.store.blobs import BlobError, BlobStore  # noqa: PLC0415 (only differential checkpoints need it)

    try:
        return BlobStore(SaveDir.of_checkpoint(directory.resolve())).internalize(obj, refs)
    except BlobError as exc:
        raise CheckpointInvalid(directory, file, str(exc)) from None


MAX_NODES = 2_000_000  # containers and values in one part file: far above any real state dict


def check_plausible(obj: Any, directory: Path, file: str) -> None:
    """Refuse a loaded structure that is too large to walk (a few kilobytes of shared lists can describe 2**40
    values) or a tensor that claims more bytes than its storage holds (a view that would read past it)."""

    def check(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.numel():
            extent = value.storage_offset() + sum((n - 1) * st for n, st in zip(value.shape, value.stride())) + 1
            if min(value.stride(), default=0) < 0 or extent * value.element_size() > value.untyped_storage().nbytes():
                message = (
                    f"{directory}/{file}: a tensor of shape {tuple(value.shape)} claims more bytes than its storage"
                )
                raise UnsafeCheckpointError(f"{message} holds; refusing it", directory, file)

    try:
        tree.visit(obj, check, limit=MAX_NODES)
    except tree.TooLarge:
        message = f"{directory}/{file} holds a structure of more than {MAX_NODES:,} values"
        raise UnsafeCheckpointError(
            f"{message} (shared references that expand?); refusing it", directory, file
        ) from None
