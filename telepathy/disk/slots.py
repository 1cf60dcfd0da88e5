"""Shared-memory snapshot slots: the trainer copies each step's state into one of two files in ``/dev/shm`` (a
double buffer), its supervisor reads the newest complete one after the trainer died (SIGKILL, OOM, segfault) and
commits it. No torch here: the supervisor reads raw bytes; :mod:`telepathy.store.step_snapshots` turns state into
slots and back.

A slot file::

    [0:64)        header: magic, seq_begin, seq_end, meta_len, data_len, data_at, layout_len, meta_at
                  (little-endian u64)
    [64:…)        layout: JSON (the table of tensors, the state's constants, the store's options)
    [meta_at:…)   meta: JSON (step, checkpoint info, the structure of the state with tensors as references)
    [data_at:…)   data: the tensors' bytes, each at a 64-byte aligned offset

A reader merges the two JSON objects (no key in both). The layout changes only when the state changes layout,
so it is written into a slot only then, not at every step. ``meta_at`` and ``data_at`` leave room for both to
grow, so the data stays where it was from one step to the next and the trainer can keep its views of a slot.

Writing stores ``seq_begin = n`` first and ``seq_end = n`` last, so a copy torn by a kill (or caught half-way by a
reader) has ``seq_begin != seq_end`` and is never used; the other slot then holds the previous complete step.
The directory is made by the supervisor, private to the user (0700), and removed when it exits. It holds a marker
file (:data:`MARKER`) that the supervisor keeps ``flock``-ed while it lives: a later supervisor removes a directory
left by one that died (SIGKILL, OOM) only if it carries the marker and the lock can be taken — never a directory
it did not make, never a live supervisor's in another PID namespace sharing ``/dev/shm``.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import secrets
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SLOT_DIR_ENV = "TELEPATHY_SNAPSHOT_DIR"
MAGIC = b"TPSLOT3\0"
HEADER = struct.Struct("<8sQQQQQQQ")  # magic, seq_begin, seq_end, meta_len, data_len, data_at, layout_len, meta_at
HEADER_BYTES = 64
ALIGN = 64
SLOTS = 2
META_ROOM = 16 << 10  # bytes kept for the meta before the data (doubled when a meta outgrows it)
LAYOUT_ROOM = 64 << 10  # bytes kept for the layout before the meta (doubled alike)
MARKER = ".telepathy-slots"  # in every slot directory telepathy makes; flock-ed by its supervisor while alive


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


_held: dict[Path, int] = {}  # slot directory -> the descriptor of its flock-ed marker (this supervisor's)


def make_slot_dir(base: Path | None = None) -> Path:
    """A fresh private directory for one supervisor's slots, in ``base`` or else in shared memory when the machine
    has it, with its marker locked for as long as this process lives (and the directories of this user's
    supervisors that died without removing theirs are removed)."""
    if base is None and Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        base = Path("/dev/shm")
    remove_orphans(base or Path(tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=f"telepathy-{os.getpid()}-{secrets.token_hex(3)}-", dir=base))
    os.chmod(path, 0o700)
    fd = os.open(path / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # (close_fds: the trainer never inherits it)
    _held[path] = fd
    return path


def remove_orphans(base: Path) -> None:
    """``telepathy-*`` slot directories of this user that carry telepathy's marker and whose supervisor is gone
    (its lock on the marker can be taken)."""
    for entry in base.glob("telepathy-*-*"):
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.stat().st_uid != os.getuid():
                continue
            fd = os.open(entry / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # no marker: not a directory telepathy made (or one from before markers): left alone
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its supervisor is alive, maybe in another PID namespace
            continue
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)


def remove_slot_dir(path: Path) -> None:
    fd = _held.pop(path, None)
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        os.close(fd)


def is_slot_dir(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a slot directory a trainer may write in: a real directory (not a link), this user's,
    private (0700), holding telepathy's marker; else why not."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory (a symlink or a file)"
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return "it is not private to this user (owner and mode 0700)"
    if not os.path.isfile(Path(path) / MARKER) or os.path.islink(Path(path) / MARKER):
        return "it was not made by a telepathy supervisor (no marker)"
    return None


def clear_slots(path: Path) -> None:
    """Forget the snapshots of an earlier trainer (a restarted one counts its sequence from 1 again)."""
    for slot in range(SLOTS):
        (path / f"slot{slot}").unlink(missing_ok=True)


class SlotWriter:
    """The trainer's side: alternate between the two slots, growing a slot file when the state grows.
    ``on_unmap(mapping)`` is called before a mapping is closed, so that views of it can be dropped first."""

    def __init__(self, directory: str | os.PathLike, on_unmap: Callable[[mmap.mmap], None] | None = None) -> None:
        self.dir = Path(directory)
        self._maps: dict[int, tuple[mmap.mmap, int]] = {}  # slot -> (mapping, capacity)
        self.seq = 0
        self.meta_room = META_ROOM
        self.layout_room = LAYOUT_ROOM
        self.on_unmap = on_unmap
        self._layout_in: dict[int, tuple[bytes, int, mmap.mmap]] = {}  # slot -> the layout in it, where, which file
        self._begun: int | None = None  # the seq begin() marked, until write() completes it

    def write(self, step: int, meta: dict[str, Any] | bytes, data_len: int,
              fill: Callable[[mmap.mmap, int, int], None], layout: bytes = b"{}",
              before_moving: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Write one snapshot: ``meta`` (a dict, or the JSON text of one) and ``layout`` (the JSON text of an
        object; written again only when it is another object than the one in this slot), then
        ``fill(mapping, offset, length)`` copies ``data_len`` bytes of tensors into
        ``mapping[offset : offset + length]``. ``before_moving()`` is called before the data of a slot
        :meth:`begin` marked moves or its mapping is replaced (a copy into it must end first)."""
        if self._begun != self.seq:  # (else begin() has marked this slot already)
            self.seq += 1
        self._begun = None
        slot = self.seq % SLOTS
        if isinstance(meta, dict):
            meta = json.dumps(meta, separators=(",", ":")).encode()
        for text in (meta, layout):
            if not text.startswith(b"{") or not text.endswith(b"}"):
                raise ValueError("a slot's meta and layout must be JSON objects")
        meta_bytes = b'{"step":%d%s' % (step, b"}" if meta.strip() == b"{}" else b"," + meta[1:])
        places = self._places()
        while len(meta_bytes) > self.meta_room:
            self.meta_room *= 2
        while len(layout) > self.layout_room:
            self.layout_room *= 2
        meta_at, data_at = self._places()
        current = self._maps.get(slot)
        if before_moving is not None and ((meta_at, data_at) != places or current is None
                                          or current[1] < data_at + data_len):  # fmt: skip
            before_moving()
        mapping = self._mapping(slot, data_at + data_len)
        header = (MAGIC, self.seq, 0, len(meta_bytes), data_len, data_at, len(layout), meta_at)
        HEADER.pack_into(mapping, 0, *header)  # seq_end 0: being written
        written = self._layout_in.get(slot)
        if written is None or written[2] is not mapping or written[1] != meta_at or written[0] != layout:
            mapping[HEADER_BYTES : HEADER_BYTES + len(layout)] = layout
            self._layout_in[slot] = (layout, meta_at, mapping)
        mapping[meta_at : meta_at + len(meta_bytes)] = meta_bytes
        fill(mapping, data_at, data_len)
        HEADER.pack_into(mapping, 0, MAGIC, self.seq, self.seq, *header[3:])

    def begin(self, data_len: int) -> tuple[mmap.mmap, int]:
        """Mark the next slot as being written and return (its mapping, where its data goes), for a copy that
        starts before the meta is known; the next :meth:`write` completes this slot (its data may then move,
        if the meta outgrew its room: the caller checks where ``fill`` is asked to copy)."""
        if self._begun != self.seq:  # (a slot begun and never completed is begun again: the other one holds the
            self.seq += 1  # last complete snapshot, and keeps it)
        self._begun = self.seq
        meta_at, data_at = self._places()
        mapping = self._mapping(self.seq % SLOTS, data_at + data_len)
        HEADER.pack_into(mapping, 0, MAGIC, self.seq, 0, 0, data_len, data_at, 0, meta_at)  # seq_end 0: being written
        return mapping, data_at

    def _places(self) -> tuple[int, int]:
        meta_at = align(HEADER_BYTES + self.layout_room)
        return meta_at, align(meta_at + self.meta_room)

    def _mapping(self, slot: int, size: int) -> mmap.mmap:
        current = self._maps.get(slot)
        if current is not None and current[1] >= size:
            return current[0]
        if current is not None:  # (forgotten first: if the new one cannot be made, none is left to reuse)
            del self._maps[slot]
            self._layout_in.pop(slot, None)
            self._unmap(current[0])
        capacity = max(size, int(size * 1.25))  # room for a state that grows a little (optimizer state appears)
        path = self.dir / f"slot{slot}"
        tmp = self.dir / f".slot{slot}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, capacity)
            if hasattr(os, "posix_fallocate"):  # claim the memory now: a full /dev/shm is an error here, not a
                os.posix_fallocate(fd, 0, capacity)  # SIGBUS in the middle of a copy into a sparse mapping
            mapping = mmap.mmap(fd, capacity)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)  # a reader never sees a half-sized file under the slot's name
        self._maps[slot] = (mapping, capacity)
        return mapping

    def _unmap(self, mapping: mmap.mmap) -> None:
        if self.on_unmap is not None:
            self.on_unmap(mapping)
        mapping.close()

    def close(self) -> None:
        for mapping, _ in self._maps.values():
            self._unmap(mapping)
        self._maps.clear()


def read_newest(directory: str | os.PathLike) -> tuple[dict[str, Any], bytes] | None:
    """The newest complete snapshot (meta, tensor bytes) in the slots, or None. A slot whose copy was torn
    (``seq_begin != seq_end``), whose header is damaged or whose size lies is skipped."""
    found: list[tuple[int, dict[str, Any], bytes]] = []
    for slot in range(SLOTS):
        read = _read_slot(Path(directory) / f"slot{slot}")
        if read is not None:
            found.append(read)
    if not found:
        return None
    _, meta, data = max(found, key=lambda f: f[0])
    return meta, data


def _read_slot(path: Path) -> tuple[int, dict[str, Any], bytes] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO put in its place: no hang
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or size < HEADER_BYTES:
            return None
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping:
            magic, begin, end, meta_len, data_len, data_at, layout_len, meta_at = HEADER.unpack_from(mapping, 0)
            if magic != MAGIC or begin == 0 or begin != end:
                return None
            if not HEADER_BYTES + layout_len <= meta_at <= meta_at + meta_len <= data_at <= data_at + data_len <= size:
                return None
            layout_bytes = mapping[HEADER_BYTES : HEADER_BYTES + layout_len]
            meta_bytes, data = mapping[meta_at : meta_at + meta_len], mapping[data_at : data_at + data_len]
            if HEADER.unpack_from(mapping, 0)[1:3] != (begin, end):  # rewritten while we copied it out
                return None
        meta, layout = json.loads(meta_bytes), json.loads(layout_bytes)
        if not (isinstance(meta, dict) and isinstance(layout, dict) and isinstance(meta.get("step"), int)):
            return None
        if meta.keys() & layout.keys():
            return None
        return begin, {**meta, **layout}, data
    except (OSError, ValueError, struct.error, RecursionError, MemoryError):  # damaged or hostile: the other slot
        return None
    finally:
        os.close(fd)
