"""Content-addressed tensor blobs: differential and compressed checkpoints.

With ``differential`` (or ``compress``) on, every tensor of at least ``MIN_BLOB_BYTES`` is stored once as a
blob named by the xxh3-128 of its bytes and the part file keeps a small reference in its place: a large blob in its
own file ``SAVE_DIR/blobs/<2 hex>/<name>.<codec>``, the smaller new blobs of one save end to end in one pack
(:mod:`telepathy.disk.packs`). A tensor that did not change since any kept checkpoint (frozen layers, unchanged
buffers) hashes to an existing blob and is not written again. Blobs are written durably (temporary files fsynced
together, renamed, their directories fsynced) before the checkpoint that references them is committed, and a blob
file or pack is deleted only when no committed or emergency checkpoint references it any more
(:meth:`telepathy.disk.catalog.Catalog.collect_blobs`, run after pruning by the single writer).

Reading back (:meth:`BlobStore.internalize`) checks every reference against the manifest first, then reads,
inflates and hashes each blob once, however many references name it; a compressed blob is never inflated past the
size its tensor claims. A second reference to a blob gets a private copy-on-write mapping of the same bytes: equal
tensors (zeros, twin layers) must not alias after a resume, and a small hostile part naming one blob thousands of
times must not cost thousands of copies.

Compression (``compress``): zstd over byte planes (all first bytes of the elements, then all second bytes, ...),
which groups the low-entropy exponent bytes of floats; a blob is stored raw when compression saves less than 5%,
and compression switches itself off for the run when it is slower than the disk.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import xxhash

from telepathy import tree
from telepathy.disk import durable
from telepathy.disk.catalog import Catalog
from telepathy.disk.packs import PACK_BELOW, PackWriter, retiring_packs
from telepathy.disk.save_dir import BLOBS, TEMP_PREFIX, SaveDir, is_blob_name  # noqa: F401 (BLOBS: re-exported)
from telepathy.store.dtypes import DTYPES

log = logging.getLogger("telepathy")

# Smaller tensors stay inside the part file. Test hook: TELEPATHY_TEST_MIN_BLOB_BYTES=1 makes every tensor a blob.
MIN_BLOB_BYTES = int(os.environ.get("TELEPATHY_TEST_MIN_BLOB_BYTES", "") or 64 * 1024)
BLOB_KEY = "__telepathy_blob__"
_DTYPES = {name: d for name, d in DTYPES.items() if not d.is_complex}  # (complex tensors stay in torch.save)


class BlobStore:
    def __init__(self, save_dir: SaveDir | str | os.PathLike, compress: bool = False, level: int = 3) -> None:
        self.dir = save_dir if isinstance(save_dir, SaveDir) else SaveDir(save_dir)
        self.root = self.dir.blobs
        self.compress = compress
        self.level = level
        self.known: dict[str, dict[str, Any]] = {}  # blobs the kept checkpoints reference (manifest entries)
        self._retiring: set[str] = set()  # packs mostly dead: their blobs are written again, not named there
        self._checked: set[str] = set()  # known blobs re-hashed by this process
        self.bytes_written = 0  # stored bytes written by this process (a benchmark/test figure)
        self._compress_seconds = self._write_seconds = 0.0
        self._compress_in = self._write_out = 0
        self._unpublished: list[tuple[Path, Path]] = []  # (temporary file, final name) of blobs not yet durable
        self._new_pack: PackWriter | None = None  # this save's pack of small new blobs, once it has one

    def learn(self, live: dict[str, dict[str, Any]]) -> None:
        """What the kept checkpoints reference (blob name -> newest manifest entry), after a prune or at start."""
        self.known = live
        self._retiring = retiring_packs(self.dir, live)

    # ------------------------------------------------------------------------------------------ write
    def externalize(self, obj: Any, refs: dict[str, dict[str, Any]]) -> Any:
        """``obj`` with large tensors replaced by blob references (writing the blobs that do not exist yet);
        ``refs`` collects ``{blob name: manifest entry}`` for the checkpoint's manifest. The new blobs are
        durable when it returns."""

        def leaf(value: Any, path: str) -> Any:
            big = isinstance(value, torch.Tensor) and value.numel() * value.element_size() >= MIN_BLOB_BYTES
            return self._put(value, refs) if big and str(value.dtype) in _DTYPES else tree.KEEP

        try:
            skeleton = tree.transform(obj, leaf, strict=True)
            self._publish()  # durable before anything that references them is written
        except BaseException:
            self._discard_unpublished()
            raise
        return skeleton

    def _put(self, tensor: torch.Tensor, refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        name = xxhash.xxh3_128_hexdigest(raw)
        if name not in refs:
            refs[name] = self._existing(name) or self._write(name, raw, tensor.element_size())
        return {BLOB_KEY: name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}

    def _existing(self, name: str) -> dict[str, Any] | None:
        """The manifest entry of a blob a kept checkpoint already references, if its file is in place and
        intact and not in a retiring pack. Each is re-hashed once per process before its first reuse: a damaged
        shared blob is written again from the tensor in memory instead of poisoning every new one (a blob file is
        replaced, which repairs the older checkpoints too; a pack is never written in place)."""
        entry = self.known.get(name)
        if entry is None or entry.get("pack") in self._retiring or not self.dir.blob_file(name, entry).is_file():
            return None
        if name not in self._checked:
            if self.verify({name: entry}) is not None:
                log.warning("blob %s is damaged; writing it again", name)
                return None
            self._checked.add(name)
        return entry

    def _write(self, name: str, raw: np.ndarray, element_size: int) -> dict[str, Any]:
        codec, data = "raw", memoryview(raw)
        if self.compress:
            started = time.perf_counter()
            packed = self._compress(raw, element_size)
            self._compress_seconds += time.perf_counter() - started
            self._compress_in += raw.nbytes
            if len(packed) < 0.95 * raw.nbytes:
                codec, data = "zst", memoryview(packed)
        started = time.perf_counter()
        stored_digest = name if codec == "raw" else xxhash.xxh3_128_hexdigest(data)
        entry: dict[str, Any] = {"codec": codec, "bytes": len(data), "stored_xxh3_128": stored_digest}
        if len(data) < PACK_BELOW:
            if self._new_pack is None:
                self._new_pack = PackWriter(self.dir)  # published (or discarded) with this save's other new blobs
            entry.update(pack=self._new_pack.name, offset=self._new_pack.append(name, data))
        else:
            path = self.path(name, codec)
            durable.make_dirs(path.parent)
            tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
            if tmp.exists():
                tmp.unlink()
            self._unpublished.append((tmp, path))  # before the write: a failed write leaves nothing behind either
            durable.write_file_for_later(tmp, lambda f: durable.write_all(f, data))  # durable in _publish()
        self._write_seconds += time.perf_counter() - started
        self._write_out += len(data)
        self.bytes_written += len(data)
        self.known[name] = entry
        self._checked.add(name)
        return entry

    def _publish(self) -> None:
        """Make this save's new blobs durable and give them their names: every file fsynced, then renamed, then
        every directory that gained one fsynced, the fsyncs issued together so that the file system commits them
        in a few journal transactions instead of one or two per blob (a dense differential save of a few hundred
        tensors otherwise costs ~3x a full write). Only then may a checkpoint reference them."""
        if self._new_pack is not None:
            self._new_pack.close()
            self._unpublished.append((self._new_pack.tmp, self._new_pack.path))
        if not self._unpublished:
            return
        started = time.perf_counter()
        try:
            durable.fsync_together([tmp for tmp, _ in self._unpublished])
            for tmp, path in self._unpublished:
                os.replace(tmp, path)
            durable.fsync_together(sorted({path.parent for _, path in self._unpublished}), directories=True)
        except BaseException:
            self._discard_unpublished()
            raise
        self._unpublished.clear()
        self._new_pack = None
        self._write_seconds += time.perf_counter() - started
        self._maybe_stop_compressing()

    def _discard_unpublished(self) -> None:
        """After a failed save: remove the new blobs' temporary files (and forget what they were)."""
        pack, self._new_pack = self._new_pack, None  # first: a later save must never append to this one
        unpublished, self._unpublished = self._unpublished, []
        forget = [path.name.split(".")[0] for _, path in unpublished] + (pack.members if pack is not None else [])
        for name in forget:
            self.known.pop(name, None)
            self._checked.discard(name)
        if pack is not None:
            pack.discard()
        for tmp, _ in unpublished:
            tmp.unlink(missing_ok=True)

    def _compress(self, raw: np.ndarray, element_size: int) -> bytes:
        import zstandard

        planes = raw.reshape(-1, element_size).T.copy() if element_size > 1 else raw
        return zstandard.ZstdCompressor(level=self.level).compress(planes.tobytes())

    def _maybe_stop_compressing(self) -> None:
        """Compression that runs slower than the disk writes only makes saves longer: switch it off."""
        if self.compress and self._compress_in >= 64 * 2**20 and self._write_out and self._compress_seconds:
            compress_rate = self._compress_in / self._compress_seconds
            disk_rate = self._write_out / max(self._write_seconds, 1e-9)
            if compress_rate < disk_rate:
                log.info("compression (%.0f MB/s) is slower than the disk (%.0f MB/s) here; writing raw from now "
                         "on", compress_rate / 1e6, disk_rate / 1e6)  # fmt: skip
                self.compress = False

    # ------------------------------------------------------------------------------------------- read
    def path(self, name: str, codec: str) -> Path:
        return self.dir.blob_path(name, codec)

    def internalize(self, obj: Any, refs: Mapping[str, Mapping[str, Any]]) -> Any:
        """The inverse of :meth:`externalize`: references replaced by tensors read from their blobs. Every
        reference is checked before any blob is read; each blob is then read, decompressed and hashed once
        however many references name it (raises :class:`BlobError`)."""
        sizes = _blob_sizes(obj, refs)
        blobs: dict[str, _Blob] = {}

        def leaf(value: Any, path: str) -> Any:
            if not _is_reference(value):
                return tree.KEEP
            name = value[BLOB_KEY]
            if name not in blobs:
                blobs[name] = _Blob(self._read(name, refs[name], sizes[name], _DTYPES[str(value["dtype"])]))
            return blobs[name].take().view(_DTYPES[str(value["dtype"])]).reshape(value["shape"])

        try:
            return tree.transform(obj, leaf)
        except (OSError, RuntimeError, MemoryError) as exc:  # unreadable, or more mappings than the kernel allows
            raise BlobError(f"a blob could not be read back: {exc}"[:500]) from None
        finally:
            for blob in blobs.values():
                blob.close()

    def _read(self, name: str, entry: Mapping[str, Any], nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The ``nbytes`` bytes of one blob, in element order, checked against its name. A compressed blob is
        inflated only up to the size its tensor needs: a small frame claiming gigabytes is refused, not run."""
        path = self.dir.blob_file(name, entry)
        shown = f"{BLOBS}/{path.parent.name}/{path.name}"
        if entry.get("pack") is not None:
            shown += f" (blob {name} at offset {entry['offset']:,})"
        if self.root.is_symlink() or path.parent.is_symlink():
            raise BlobError(f"{shown}: blobs/ or its shard directory is a symlink; telepathy never reads through one")
        with _open_regular(path, entry, shown) as f:
            if entry["codec"] == "raw":
                data = torch.empty(nbytes, dtype=torch.uint8)
                _read_into(f, data.numpy(), shown)
            else:
                data = _inflate(_read_exactly(f, entry["bytes"], shown), nbytes, dtype.itemsize, shown)
        if xxhash.xxh3_128_hexdigest(data.numpy()) != name:
            raise BlobError(f"{shown} does not hash to its name (corrupted)")
        return data

    def verify(self, refs: Mapping[str, Mapping[str, Any]]) -> str | None:
        """None when every referenced blob has its recorded size and hash, else which one does not and why."""
        return Catalog(self.dir).verify_blobs(dict(refs))  # type: ignore[arg-type]


class BlobError(ValueError):
    """A blob reference, or the blob it names, cannot give back its tensor: not listed, missing, corrupted, or not
    the size its tensor claims. The checkpoint is damaged (a resume skips it like a corrupt one)."""


MAX_SHARED_REFERENCES = 16_384  # second and later references to a blob in one part: far above any real state


def _is_reference(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get(BLOB_KEY) is not None


def _blob_sizes(obj: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """``{blob name: bytes of its tensor}`` for the references in ``obj``, all checked before any blob is read: a
    name the manifest lists, a known dtype, a shape of non-negative integers, and the same byte count in every
    reference to one blob (a raw blob's: its stored size)."""
    sizes: dict[str, int] = {}
    count = 0

    def check(value: Any) -> None:
        nonlocal count
        if not _is_reference(value):
            return
        name, dtype, shape = value[BLOB_KEY], _DTYPES.get(str(value.get("dtype"))), value.get("shape")
        entry = refs.get(name) if is_blob_name(name) else None
        if entry is None or dtype is None:
            raise BlobError(f"blob reference {str(name)[:40]!r} is not listed in the manifest or has an unknown dtype")
        if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
            raise BlobError(f"blob reference {name} has an implausible shape {str(shape)[:60]}")
        nbytes = math.prod(shape) * dtype.itemsize
        if sizes.setdefault(name, nbytes) != nbytes or (entry["codec"] == "raw" and nbytes != entry["bytes"]):
            raise BlobError(f"the references to blob {name} disagree with it about its size ({nbytes} bytes?)")
        count += 1

    tree.visit(obj, check)
    if count - len(sizes) > MAX_SHARED_REFERENCES:
        raise BlobError(f"{count} references name only {len(sizes)} blob(s); more than {MAX_SHARED_REFERENCES:,} "
                        "repeats is not a state telepathy wrote, refusing it")  # fmt: skip
    return sizes


class _Blob:
    """One blob's tensor bytes, read once. The first reference gets them, every further one a private
    copy-on-write mapping of them: no two references alias (an optimizer updating one tensor in place must not
    change another that had the same bytes), yet a part naming one blob thousands of times costs no more memory
    than the blob until the copies are written to."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.taken, self._file, self._source = data, False, None, ""

    def take(self) -> torch.Tensor:
        if not self.taken:
            self.taken = True
            return self.data
        if self.data.numel() == 0:
            return self.data.clone()
        if self._file is None:
            self._file = _memory_file(self.data)
            fd = self._file.fileno()
            self._source = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"
        storage = torch.UntypedStorage.from_file(self._source, shared=False, nbytes=self.data.numel())
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # the mappings keep what they map


def _memory_file(data: torch.Tensor) -> BinaryIO:
    """An unnamed file holding ``data``'s bytes (in memory where the OS has memfd), to be mapped privately."""
    if hasattr(os, "memfd_create"):
        file: BinaryIO = os.fdopen(os.memfd_create("telepathy-blob", os.MFD_CLOEXEC), "w+b")
    else:
        file = tempfile.TemporaryFile()
    file.write(memoryview(data.numpy()))
    file.flush()
    return file


def _open_regular(path: Path, entry: Mapping[str, Any], shown: str) -> BinaryIO:
    """A blob's file opened for reading at the blob's first byte, if it is a regular file (not a link, FIFO or
    device) that holds the blob: exactly its bytes, or for a pack at least up to the blob's end."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never even open a FIFO or a device
            raise BlobError(f"{shown}: not a regular file (symlink or special file)")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BlobError(f"{shown}: missing or not readable ({exc.strerror})") from None
    file = os.fdopen(fd, "rb", buffering=0)
    st, size, offset = os.fstat(fd), entry["bytes"], entry.get("offset", 0)
    packed = entry.get("pack") is not None
    if not stat.S_ISREG(st.st_mode) or (st.st_size < offset + size if packed else st.st_size != size):
        file.close()
        where = f"ending at byte {offset + size:,}" if packed else f"of the {size:,} bytes the manifest lists"
        raise BlobError(f"{shown}: not a regular file holding the blob {where}")
    file.seek(offset)
    return file


def _read_exactly(file: BinaryIO, nbytes: int, shown: str) -> bytes:
    data = bytearray(nbytes)
    _read_into(file, np.frombuffer(data, dtype=np.uint8), shown)
    return bytes(data)


def _read_into(file: BinaryIO, out: np.ndarray, shown: str) -> None:
    view, got = memoryview(out), 0
    while got < out.nbytes:
        n = file.readinto(view[got:])
        if not n:
            raise BlobError(f"{shown}: shorter than its tensor (truncated while read)")
        got += n


def _inflate(frame: bytes, nbytes: int, element_size: int, shown: str) -> torch.Tensor:
    """Decompress a byte-plane frame into ``nbytes`` bytes in element order, never producing more: a frame that
    says or turns out to hold more than its tensor is refused before (or as soon as) it passes that size."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(frame)  # -1: the frame does not say
        if declared not in (-1, nbytes):
            raise BlobError(f"{shown} inflates to {declared:,} bytes but its tensor holds {nbytes:,}; refusing it")
        out = torch.empty(nbytes, dtype=torch.uint8)
        planes = np.empty(nbytes, dtype=np.uint8) if element_size > 1 else out.numpy()
        reader = zstandard.ZstdDecompressor().stream_reader(frame, read_size=max(len(frame), 1))
        view, got = memoryview(planes), 0
        while got < nbytes and (n := reader.readinto(view[got:])):
            got += n
        if got != nbytes or reader.read(1):
            raise BlobError(f"{shown} inflates to {'less' if got < nbytes else 'more'} than the {nbytes:,} bytes "
                            "its tensor holds; refusing it")  # fmt: skip
    except zstandard.ZstdError as exc:
        raise BlobError(f"{shown}: not a valid zstd frame ({exc})") from None
    if element_size > 1:
        out.numpy().reshape(-1, element_size)[...] = planes.reshape(element_size, -1).T
    return out
