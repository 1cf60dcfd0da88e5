"""``python -m telepathy verify PATH``: check one checkpoint, or every checkpoint of a save dir, against its
manifest (sizes and xxh3-128 hashes, and the shared blobs it references; names, symlinks and sizes that would
escape or lie are failures).

Prints one line per checkpoint and exits 1 when anything failed, 0 when all verified, 2 when PATH is not a
telepathy checkpoint or save dir. ``--load`` also loads every file with ``weights_only=True`` (slower;
catches a file that would run code even if its manifest was rewritten to match)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from telepathy.disk.catalog import verify_checkpoint as verify_files
from telepathy.disk.contents import SHARD_METADATA, part_name
from telepathy.disk.manifest import MANIFEST_NAME
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import CheckpointInvalid


def verify_checkpoint(directory: Path, load: bool = False) -> str | None:
    """None when ``directory`` verifies, else why not (file: reason)."""
    try:
        manifest = verify_files(directory)
        if load:
            from telepathy.store.formats import load_part  # noqa: PLC0415 (torch: only --load needs it)

            for name in manifest["files"]:
                if part_name(name) is not None:
                    load_part(directory, part_name(name))
                elif name == SHARD_METADATA:  # DCP's pickled metadata, through the allow-list
                    from telepathy.store import sharded  # noqa: PLC0415 (DCP is slow to import)

                    sharded.read_metadata(directory)
    except CheckpointInvalid as exc:  # UnsafeCheckpointError too
        return f"{exc.file}: {exc.reason}" if exc.file else exc.reason
    except pickle.UnpicklingError as exc:
        return f"{SHARD_METADATA} is not a safe checkpoint file: {exc}"
    except Exception as exc:  # a file that verifies but does not load (e.g. written by a foreign tool)
        return f"does not load: {exc!r}"
    return None


def verify_path(path: Path, load: bool = False) -> tuple[list[str], int]:
    """Report lines and the exit code for ``path`` (a checkpoint directory or a save dir)."""
    if (path / MANIFEST_NAME).exists():
        problem = verify_checkpoint(path, load)
        return [f"OK     {path}" if problem is None else f"FAILED {path}: {problem}"], 0 if problem is None else 1
    save_dir = SaveDir(path)
    if not path.is_dir() or not (save_dir.checkpoints.is_dir() or save_dir.latest.is_symlink()):
        return [f"{path} is neither a telepathy checkpoint (no {MANIFEST_NAME}) nor a save dir (no checkpoints/)"], 2
    lines, failed = [], 0
    candidates = save_dir.all_checkpoints()
    for directory in candidates:
        problem = verify_checkpoint(directory, load)
        failed += problem is not None
        lines.append(f"OK     {directory}" if problem is None else f"FAILED {directory}: {problem}")
    pointer = save_dir.latest_target()
    if pointer is not None and pointer not in [p.resolve() for p in candidates]:
        failed += 1
        lines.append(f"FAILED {save_dir.latest} -> {os.readlink(save_dir.latest)}: not a committed checkpoint")
    if save_dir.temporaries():
        lines.append(f"note   {len(save_dir.temporaries())} temporary dir(s) of an interrupted save or prune; "
                     "the next run removes them")  # fmt: skip
    if not candidates:
        lines.append("no checkpoints yet")
    else:
        lines.append(f"{len(candidates) - failed} of {len(candidates)} checkpoints verified, {failed} failed")
    return lines, 1 if failed else 0
