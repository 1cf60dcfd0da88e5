"""Every path of a save directory, named in one place (no torch: the operator commands read a save dir in a
fraction of a second)::

    SAVE_DIR/latest -> checkpoints/step_00001200      the newest commit (a convenience; loading scans checkpoints/)
    SAVE_DIR/checkpoints/step_N/                      one directory per committed checkpoint
    SAVE_DIR/checkpoints/.tmp-step_N-<host>-<pid>-…   a save in progress; .trash-…: a prune in progress
    SAVE_DIR/emergency/step_N_<time>/                 after an unexpected exception; never resumed automatically
    SAVE_DIR/blobs/ab/<32 hex>.raw|.zst               shared tensors of differential/compressed checkpoints
    SAVE_DIR/blobs/cd/<32 hex>.pack                   one save's small new blobs, end to end (see disk/packs.py)
    SAVE_DIR/events.jsonl                             the run's life, one JSON object per line
    SAVE_DIR/.telepathy.lock, .telepathy.lock.json    the writer lock and who holds it

:class:`SaveDir` also lists checkpoints (once, for every caller) and says, without taking it, whether a live
process holds the writer lock.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
EMERGENCY = "emergency"
LATEST = "latest"
BLOBS = "blobs"
EVENTS = "events.jsonl"
LOCK = ".telepathy.lock"
HOLDER = ".telepathy.lock.json"
TEMP_PREFIX = ".tmp-"  # a save (or blob write) in progress
TRASH_PREFIX = ".trash-"  # a pruned checkpoint being deleted
INVALID_PREFIX = ".invalid-"  # an invalid checkpoint set aside (never deleted)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_BLOB_NAME = re.compile(r"^[0-9a-f]{32}$")
BLOB_SUFFIXES = ("raw", "zst", "pack")  # a blob file of one codec, or a pack of several blobs


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_blob_name(name: object) -> bool:
    """A blob's name: the 32 hex digits of its xxh3-128 hash."""
    return isinstance(name, str) and bool(_BLOB_NAME.match(name))


def is_blob_file_name(name: str) -> bool:
    """A name telepathy gives a file in a blob shard: ``<32 hex>.raw``, ``.zst`` or ``.pack``."""
    stem, _, suffix = name.partition(".")
    return is_blob_name(stem) and suffix in BLOB_SUFFIXES


def is_temporary(name: str) -> bool:
    """Whether a directory entry is a temporary of an unfinished save or prune (removable when stale)."""
    return name.startswith((TEMP_PREFIX, TRASH_PREFIX))


class SaveDir:
    """The paths of one save directory. Cheap to create; touches nothing until asked."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / CHECKPOINTS
        self.emergency = self.root / EMERGENCY
        self.latest = self.root / LATEST
        self.blobs = self.root / BLOBS
        self.events = self.root / EVENTS
        self.lock_file = self.root / LOCK
        self.holder_file = self.root / HOLDER

    def __repr__(self) -> str:
        return f"SaveDir({str(self.root)!r})"

    def __str__(self) -> str:
        return str(self.root)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> SaveDir:
        """The save dir holding a checkpoint directory (``SAVE_DIR/checkpoints/step_N`` or ``SAVE_DIR/emergency/…``)."""
        return cls(Path(checkpoint).parent.parent)

    # ------------------------------------------------------------------------------------------ names
    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    def blob_path(self, name: str, codec: str) -> Path:
        return self.blobs / name[:2] / f"{name}.{codec}"

    def blob_file(self, name: str, entry: dict) -> Path:
        """The file holding a blob, from its manifest entry: a pack (``entry["pack"]``) or its own file."""
        pack = entry.get("pack")
        return self.blob_path(pack, "pack") if pack is not None else self.blob_path(name, entry["codec"])

    def looks_like_save_dir(self) -> bool:
        """Whether anything telepathy writes is here (checkpoints/, latest or events.jsonl)."""
        return any(p.exists() or p.is_symlink() for p in (self.checkpoints, self.latest, self.events))

    # ---------------------------------------------------------------------------------------- listing
    def committed(self) -> list[CheckpointRef]:
        """Committed checkpoint directories, oldest first (not yet verified; symlinks are not checkpoints)."""
        refs = []
        for entry in _entries(self.checkpoints):
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                refs.append(CheckpointRef(int(match.group(1)), entry))
        return sorted(refs, key=lambda r: r.step)

    def emergencies(self) -> list[Path]:
        """Emergency checkpoint directories, oldest name first (never resumed automatically)."""
        return sorted(p for p in _entries(self.emergency)
                      if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))  # fmt: skip

    def all_checkpoints(self) -> list[Path]:
        """Committed then emergency checkpoint directories: everything that may reference a blob."""
        return [ref.path for ref in self.committed()] + self.emergencies()

    def temporaries(self) -> list[Path]:
        """Temporary directories of unfinished saves and prunes, in checkpoints/ and emergency/."""
        return [p for parent in (self.checkpoints, self.emergency) for p in _entries(parent) if is_temporary(p.name)]

    def latest_target(self) -> Path | None:
        """Where ``latest`` points (resolved), or None when it is not a symlink."""
        if not self.latest.is_symlink():
            return None
        try:
            return (self.root / os.readlink(self.latest)).resolve(strict=False)
        except (OSError, RuntimeError):  # a loop of links
            return None

    # ----------------------------------------------------------------------------------- containment
    def layout_problems(self) -> list[str]:
        """What in this save dir would make a writer reach outside it or act on something it did not make: a
        symlinked ``checkpoints/``, ``emergency/``, ``blobs/``, event log or lock file, or one of the wrong kind."""
        problems = []
        for path, kind in ((self.checkpoints, "dir"), (self.emergency, "dir"), (self.blobs, "dir"),
                           (self.events, "file"), (self.lock_file, "file"), (self.holder_file, "file")):  # fmt: skip
            if path.is_symlink():
                real = "directory" if kind == "dir" else "file"
                problems.append(f"{path} is a symbolic link; telepathy reads, writes and deletes only inside the save "
                                f"dir: replace it with a real {real}")  # fmt: skip
            elif path.exists() and (not path.is_file() if kind == "file" else not path.is_dir()):
                what = "a directory" if kind == "dir" else "a regular file"  # a FIFO would hang, a device is not ours
                problems.append(f"{path} exists but is not {what}: move it away (telepathy never deletes what it did "
                                "not make)")  # fmt: skip
        return problems

    def latest_is_a_copy(self) -> bool:
        """``latest`` is not the symlink telepathy maintains: a real directory (a copy tool followed the link), or
        a file, FIFO, ... someone made under that name. A writer sets it aside; it is never replaced or deleted."""
        return os.path.lexists(self.latest) and not self.latest.is_symlink()

    def place_for_latest_copy(self) -> Path:
        """A free name to set a foreign ``latest`` aside under: ``latest.copy-<unix time>``, plus a random suffix
        when an earlier copy already has that name."""
        aside = self.root / f"{LATEST}.copy-{int(time.time())}"
        while os.path.lexists(aside):
            aside = self.root / f"{LATEST}.copy-{int(time.time())}-{secrets.token_hex(3)}"
        return aside

    # ------------------------------------------------------------------------------------ lock probe
    def live_writer(self) -> bool | None:
        """Whether a live process holds the writer lock, found without taking it (so a probe never makes a
        starting run fail to acquire it): the kernel's table of file locks, ``/proc/locks``. None when that
        cannot be read (not Linux); then the holder record decides when it names a process on this host."""
        try:
            st = os.stat(self.lock_file, follow_symlinks=False)
        except OSError:
            return False
        try:
            table = Path("/proc/locks").read_text()
        except OSError:
            return self._holder_alive_here()
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        return any(dev in line.split() for line in table.splitlines())

    def _holder_alive_here(self) -> bool | None:
        try:
            holder = json.loads(self.holder_file.read_text())
            if holder.get("host") != socket.gethostname():
                return None
            os.kill(int(holder["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _entries(directory: Path) -> list[Path]:
    """A directory's entries; none when it is missing, not a directory, or a symlink (never followed out)."""
    if directory.is_symlink() or not directory.is_dir():
        return []
    try:
        return list(directory.iterdir())
    except OSError:
        return []
