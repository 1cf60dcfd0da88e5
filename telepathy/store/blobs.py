"""Content-addressed tensor blobs: differential and compressed checkpoints.

With ``differential`` (or ``compress``) on, every tensor of at least ``MIN_BLOB_BYTES`` is stored once as a
blob in ``SAVE_DIR/blobs/<2 hex>/<xxh3-128 of its bytes>.<codec>`` and the part file keeps a small reference in
its place. A tensor that did not change since any kept checkpoint (frozen layers, unchanged buffers) hashes to
an existing blob and is not written again. Blobs are written durably (temp file, fsync, rename, fsync) before
the checkpoint that references them is committed, and a blob is deleted only when no committed or emergency
checkpoint references it any more (:meth:`BlobStore.collect_garbage`, run after pruning by the single writer).

Compression (``compress``): zstd over byte planes (all first bytes of the elements, then all second bytes, ...),
which groups the low-entropy exponent bytes of floats; a blob is stored raw when compression saves less than 5%,
and compression switches itself off for the run when it is slower than the disk.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from telepathy import tree
from telepathy.disk import durable
from telepathy.disk.catalog import Catalog
from telepathy.disk.save_dir import BLOBS, TEMP_PREFIX, SaveDir, is_blob_name  # noqa: F401 (BLOBS: re-exported)

log = logging.getLogger("telepathy")

# Smaller tensors stay inside the part file. Test hook: TELEPATHY_TEST_MIN_BLOB_BYTES=1 makes every tensor a blob.
MIN_BLOB_BYTES = int(os.environ.get("TELEPATHY_TEST_MIN_BLOB_BYTES", "") or 64 * 1024)
BLOB_KEY = "__telepathy_blob__"
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}  # fmt: skip


class BlobStore:
    def __init__(self, save_dir: SaveDir | str | os.PathLike, compress: bool = False, level: int = 3) -> None:
        self.dir = save_dir if isinstance(save_dir, SaveDir) else SaveDir(save_dir)
        self.root = self.dir.blobs
        self.compress = compress
        self.level = level
        self.known: dict[str, dict[str, Any]] = {}  # blobs the kept checkpoints reference (manifest entries)
        self._checked: set[str] = set()  # known blobs re-hashed by this process
        self.bytes_written = 0  # stored bytes written by this process (a benchmark/test figure)
        self._compress_seconds = self._write_seconds = 0.0
        self._compress_in = self._write_out = 0

    # ------------------------------------------------------------------------------------------ write
    def externalize(self, obj: Any, refs: dict[str, dict[str, Any]]) -> Any:
        """``obj`` with large tensors replaced by blob references (writing the blobs that do not exist yet);
        ``refs`` collects ``{blob name: manifest entry}`` for the checkpoint's manifest."""

        def leaf(value: Any, path: str) -> Any:
            big = isinstance(value, torch.Tensor) and value.numel() * value.element_size() >= MIN_BLOB_BYTES
            return self._put(value, refs) if big and str(value.dtype) in _DTYPES else tree.KEEP

        return tree.transform(obj, leaf)

    def _put(self, tensor: torch.Tensor, refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        name = xxhash.xxh3_128_hexdigest(raw)
        if name not in refs:
            refs[name] = self._existing(name) or self._write(name, raw, tensor.element_size())
        return {BLOB_KEY: name, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}

    def _existing(self, name: str) -> dict[str, Any] | None:
        """The manifest entry of a blob a kept checkpoint already references, if its file is in place and
        intact. Each is re-hashed once per process before its first reuse: a damaged shared blob is rewritten
        from the tensor in memory (which repairs the older checkpoints too) instead of poisoning every new one."""
        entry = self.known.get(name)
        if entry is None or not self.path(name, entry["codec"]).is_file():
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
            packed = self._pack(raw, element_size)
            self._compress_seconds += time.perf_counter() - started
            self._compress_in += raw.nbytes
            if len(packed) < 0.95 * raw.nbytes:
                codec, data = "zst", memoryview(packed)
        path = self.path(name, codec)
        durable.make_dirs(path.parent)
        tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
        started = time.perf_counter()
        if tmp.exists():
            tmp.unlink()
        try:
            durable.write_file_durably(tmp, lambda f: f.write(data))
            os.replace(tmp, path)
            durable.fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
            raise
        self._write_seconds += time.perf_counter() - started
        self._write_out += len(data)
        self.bytes_written += len(data)
        self._maybe_stop_compressing()
        stored_digest = name if codec == "raw" else xxhash.xxh3_128_hexdigest(data)
        self.known[name] = {"codec": codec, "bytes": len(data), "stored_xxh3_128": stored_digest}
        self._checked.add(name)
        return self.known[name]

    def _pack(self, raw: np.ndarray, element_size: int) -> bytes:
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
        """The inverse of :meth:`externalize`: references replaced by tensors read from their blobs."""

        def leaf(value: Any, path: str) -> Any:
            is_ref = isinstance(value, Mapping) and value.get(BLOB_KEY) is not None
            return self._get(value, refs) if is_ref else tree.KEEP

        return tree.transform(obj, leaf)

    def _get(self, ref: Mapping[str, Any], refs: Mapping[str, Mapping[str, Any]]) -> torch.Tensor:
        name, dtype = ref[BLOB_KEY], _DTYPES.get(str(ref.get("dtype")))
        entry = refs.get(name)
        if not is_blob_name(name) or entry is None or dtype is None:
            raise ValueError(f"blob reference {name!r} is not listed in the manifest or has an unknown dtype")
        data = self.path(name, entry["codec"]).read_bytes()
        element_size = torch.empty((), dtype=dtype).element_size()
        if entry["codec"] == "zst":
            import zstandard

            planes = np.frombuffer(zstandard.ZstdDecompressor().decompress(data), dtype=np.uint8)
            data = planes.reshape(element_size, -1).T.tobytes() if element_size > 1 else planes.tobytes()
        if xxhash.xxh3_128_hexdigest(data) != name:
            raise ValueError(f"blob {name} does not hash to its name (corrupted)")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(ref["shape"])

    def verify(self, refs: Mapping[str, Mapping[str, Any]]) -> str | None:
        """None when every referenced blob has its recorded size and hash, else which one does not and why."""
        return Catalog(self.dir).verify_blobs(dict(refs))  # type: ignore[arg-type]
