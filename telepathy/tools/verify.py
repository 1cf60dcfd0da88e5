"""``python -m telepathy verify PATH``: check one checkpoint, or every checkpoint of a save dir, against its
manifest (sizes and xxh3-128 hashes; names, symlinks and sizes that would escape or lie are failures).

Prints one line per checkpoint and exits 1 when anything failed, 0 when all verified, 2 when PATH is not a
telepathy checkpoint or save dir. ``--load`` also loads every file with ``weights_only=True`` (slower;
catches a file that would run code even if its manifest was rewritten to match)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from telepathy.disk.manifest import MANIFEST_NAME, CheckpointInvalid, verify_directory
from telepathy.store.checkpoint_store import CHECKPOINTS, EMERGENCY, CheckpointStore, UnsafeCheckpointError


def verify_checkpoint(directory: Path, load: bool = False) -> str | None:
    """None when ``directory`` verifies, else why not (file: reason)."""
    try:
        manifest = verify_directory(directory)
        if load:
            for name in manifest["files"]:
                if name.endswith(".pt"):
                    CheckpointStore.load_part(directory, name[: -len(".pt")])
                elif name == "sharded.metadata":  # DCP's pickled metadata, through the allow-list
                    from telepathy.store import sharded  # noqa: PLC0415 (DCP is slow to import)

                    sharded.read_metadata(directory)
    except CheckpointInvalid as exc:
        return f"{exc.file}: {exc.reason}"
    except UnsafeCheckpointError as exc:
        return str(exc)
    except pickle.UnpicklingError as exc:
        return f"sharded.metadata is not a safe checkpoint file: {exc}"
    except Exception as exc:  # a file that verifies but does not load (e.g. written by a foreign tool)
        return f"does not load: {exc!r}"
    return None


def verify_path(path: Path, load: bool = False) -> tuple[list[str], int]:
    """Report lines and the exit code for ``path`` (a checkpoint directory or a save dir)."""
    if (path / MANIFEST_NAME).exists():
        problem = verify_checkpoint(path, load)
        return [f"OK     {path}" if problem is None else f"FAILED {path}: {problem}"], 0 if problem is None else 1
    store = CheckpointStore(path)
    if not path.is_dir() or not ((path / CHECKPOINTS).is_dir() or (path / "latest").is_symlink()):
        return [f"{path} is neither a telepathy checkpoint (no {MANIFEST_NAME}) nor a save dir (no {CHECKPOINTS}/)"], 2
    lines, failed = [], 0
    candidates = [ref.path for ref in store.committed()]
    if (path / EMERGENCY).is_dir():
        candidates += sorted(p for p in (path / EMERGENCY).iterdir() if p.is_dir() and not p.name.startswith("."))
    for directory in candidates:
        problem = verify_checkpoint(directory, load)
        failed += problem is not None
        lines.append(f"OK     {directory}" if problem is None else f"FAILED {directory}: {problem}")
    pointer = store.latest_pointer()
    if pointer is not None and pointer not in [p.resolve() for p in candidates]:
        failed += 1
        lines.append(f"FAILED {path}/latest -> {os.readlink(path / 'latest')}: not a committed checkpoint")
    checkpoints_dir = path / CHECKPOINTS
    stale = [p for p in checkpoints_dir.iterdir() if p.name.startswith((".tmp-", ".trash-"))] if (
        checkpoints_dir.is_dir()
    ) else []  # fmt: skip
    if stale:
        lines.append(f"note   {len(stale)} temporary dir(s) of an interrupted save or prune; the next run removes them")
    if not candidates:
        lines.append("no checkpoints yet")
    else:
        lines.append(f"{len(candidates) - failed} of {len(candidates)} checkpoints verified, {failed} failed")
    return lines, 1 if failed else 0
