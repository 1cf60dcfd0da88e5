"""Where things are in a save directory, and nothing else (no torch: the operator command reads a save dir in a
fraction of a second).

    SAVE_DIR/latest -> checkpoints/step_00001200     SAVE_DIR/checkpoints/step_N/     SAVE_DIR/emergency/…
    SAVE_DIR/blobs/ab/<32 hex>.raw|.zst               SAVE_DIR/events.jsonl
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
EMERGENCY = "emergency"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_BLOB_NAME = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_blob_name(name: object) -> bool:
    """A blob's name: the 32 hex digits of its xxh3-128 hash."""
    return isinstance(name, str) and bool(_BLOB_NAME.match(name))


def committed_checkpoints(save_dir: Path) -> list[CheckpointRef]:
    """Committed checkpoint directories, oldest first (not yet verified)."""
    checkpoints_dir = Path(save_dir) / CHECKPOINTS
    if not checkpoints_dir.is_dir():
        return []
    refs = []
    for entry in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            refs.append(CheckpointRef(int(match.group(1)), entry))
    return sorted(refs, key=lambda r: r.step)


def emergency_checkpoints(save_dir: Path) -> list[Path]:
    emergency_dir = Path(save_dir) / EMERGENCY
    if not emergency_dir.is_dir():
        return []
    return sorted(p for p in emergency_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def latest_pointer(save_dir: Path) -> Path | None:
    """Where ``SAVE_DIR/latest`` points, or None when it does not exist."""
    link = Path(save_dir) / LATEST
    if not link.is_symlink():
        return None
    return (Path(save_dir) / os.readlink(link)).resolve(strict=False)
