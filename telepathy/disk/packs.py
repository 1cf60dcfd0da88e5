"""Packs: one save's small new blobs end to end in one file.

A dense differential save of a few hundred tensors used to write a few hundred blob files, and creating,
writing and fsyncing that many files cost about three times the single file of a full save (measured here:
200 blobs of 0.5 MiB, 163 ms as files, 58 ms as one file). So a blob smaller than :data:`PACK_BELOW` is
appended to the save's pack, ``SAVE_DIR/blobs/<2 hex>/<32 hex>.pack``, and its manifest entry says where::

    "<blob name>": {"codec": "raw", "bytes": 524288, "stored_xxh3_128": "...", "pack": "<32 hex>", "offset": 1048576}

Larger blobs keep a file each: a frozen embedding stays where it is whatever happens to the small tensors saved
beside it. A pack is written, fsynced and renamed like a blob file (:class:`telepathy.store.blobs.BlobStore`
publishes both together) and lives while any kept checkpoint references a blob in it.

Blobs die one by one, so a pack can hold dead bytes. When the newest references use less than half of a pack,
the next save writes those blobs again into its own pack (:func:`retiring_packs`) and the old pack dies with
the checkpoints that still name it: the space packs hold stays under about twice what they serve.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from typing import Any

from telepathy.disk import durable
from telepathy.disk.save_dir import TEMP_PREFIX, SaveDir

PACK_BELOW = 16 << 20  # stored bytes; a file per blob from here on costs < 2% of writing it


class PackWriter:
    """A new pack, written under a temporary name: :meth:`append` blobs, :meth:`close`, then the caller fsyncs
    ``tmp`` with its other new files and renames it to ``path``."""

    def __init__(self, save_dir: SaveDir) -> None:
        self.name = secrets.token_hex(16)
        self.path = save_dir.blob_path(self.name, "pack")
        self.tmp = self.path.with_name(f"{TEMP_PREFIX}{self.path.name}-{os.getpid()}")
        self.members: list[str] = []  # blob names, in the order written
        self.size = 0
        durable.make_dirs(self.path.parent)
        self._file = durable.create_file(self.tmp)

    def append(self, blob_name: str, data: memoryview) -> int:
        """Write ``data`` at the end of the pack; returns its offset."""
        offset = self.size
        durable.write_all(self._file, data)
        self.size += len(data)
        self.members.append(blob_name)
        return offset

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        """After a failed save: close without caring whether the buffered tail reaches the file (the write that
        failed may fail again: a full disk), then remove the temporary file."""
        with contextlib.suppress(OSError):
            self._file.close()  # (the descriptor is closed even when the final flush raises)
        self.tmp.unlink(missing_ok=True)


def retiring_packs(save_dir: SaveDir, live: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Packs that the newest reference to each blob (``live``: blob name -> manifest entry) uses less than half
    of: a save writes their blobs again instead of naming them there, so that they can die."""
    used: dict[str, int] = {}
    for entry in live.values():
        if entry.get("pack") is not None:
            used[entry["pack"]] = used.get(entry["pack"], 0) + entry["bytes"]
    retiring = set()
    for pack, nbytes in used.items():
        try:
            size = os.lstat(save_dir.blob_path(pack, "pack")).st_size
        except OSError:
            continue
        if 2 * nbytes < size:
            retiring.add(pack)
    return retiring
