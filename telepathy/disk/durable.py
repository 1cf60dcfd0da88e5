"""How bytes reach disk durably: fsync files and directories, publish by rename.

A rename is atomic but not durable until the directory holding it is fsynced, and a file's data is not
durable until the file is fsynced; "write a temp file and rename it" without both can leave an empty or
torn file after a power loss or node crash. Every function here finishes with the data on stable storage.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import xxhash

# Test hook: seconds to pause at each durability step, so tests can deliver a signal or SIGKILL "during a
# save" deterministically. Read once; unset (0) in normal use.
_STEP_PAUSE_S = float(os.environ.get("TELEPATHY_TEST_SAVE_STEP_PAUSE", "0") or 0)


def pause_point(label: str = "") -> None:
    """Called between the steps of a save (``label`` names the step just done, for fault-injection tools);
    sleeps only under the test hook above."""
    if _STEP_PAUSE_S > 0:
        time.sleep(_STEP_PAUSE_S)


def _open_to_hash(path: str | os.PathLike, extra_flags: int = 0) -> BinaryIO:
    """``path`` opened for one sequential read: ``O_NONBLOCK`` (a FIFO swapped in after the caller's check does not
    hang us) and, where the OS has it, a larger read-ahead."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | extra_flags)
    file = open(fd, "rb", buffering=0)
    if hasattr(os, "posix_fadvise"):  # Linux; not macOS
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:  # not a regular file: it will not match its hash
            pass
    return file


def hash_file(path: str | os.PathLike) -> str:
    """xxh3-128 of a file's bytes (manifests and blobs are checked with it), read into one reused 1 MiB buffer:
    a fresh 8 MiB ``bytes`` per chunk made the pass ~30% slower than ``dd`` from a cold cache. This read is
    also the load's disk read: the load that follows finds the pages in the page cache."""
    digest = xxhash.xxh3_128()
    buffer = memoryview(bytearray(1 << 20))
    with _open_to_hash(path) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return digest.hexdigest()


def hash_ranges(path: str | os.PathLike, ranges: list[tuple[int, int]]) -> list[str]:
    """xxh3-128 of each ``(offset, length)`` range of a file (the blobs of a pack), in one pass when the ranges
    are in order. A range past the end of the file hashes what is there (and so does not match)."""
    buffer = memoryview(bytearray(1 << 20))
    digests = []
    with _open_to_hash(path, os.O_NOFOLLOW) as f:
        for offset, length in ranges:
            digest = xxhash.xxh3_128()
            f.seek(offset)
            while length > 0 and (n := f.readinto(buffer[: min(length, len(buffer))])):
                digest.update(buffer[:n])
                length -= n
            digests.append(digest.hexdigest())
    return digests


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> None:
    """``mkdir -p`` whose new entries survive a crash: each created directory's parent is fsynced."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def write_file_durably(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> int:
    """Create ``path`` (which must not exist), let ``write`` fill it, fsync it. Returns its size."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        pause_point("file written, before its fsync")
        os.fsync(f.fileno())
        return f.tell()


WRITE_CHUNK = 128 << 10


def write_all(file: BinaryIO, data: bytes | memoryview) -> int:
    """``file.write(data)`` in slices of 128 KiB. On the Linux VMs we measured, one ``write`` of 256 KiB or more
    into the page cache was now and then ~10x slower (100 MiB in 0.5 MiB writes: 24-450 ms from one save to the
    next; in 128 KiB slices: 26-39 ms, every time); the slices cost nothing where that does not happen."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_CHUNK):
        file.write(view[start : start + WRITE_CHUNK])
    return len(view)


def create_file(path: str | os.PathLike) -> BinaryIO:
    """A new file (``path`` must not exist) open for writing, not yet durable (see :func:`fsync_together`)."""
    return open(path, "xb")


def write_file_for_later(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> int:
    """Create ``path`` (which must not exist) and let ``write`` fill it, not yet durable: the caller makes many
    such files durable together with :func:`fsync_together`. Returns its size."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        return f.tell()


def fsync_together(paths: list[Path], directories: bool = False) -> None:
    """fsync every file (or directory) in ``paths``, the calls issued at once from up to 16 threads (fsync
    releases the GIL): the file system then commits them in a few journal transactions instead of one each.
    Raises the first error."""

    def one(path: Path) -> None:
        if directories:
            fsync_dir(path)
            return
        pause_point("file written, before its fsync")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO put in its place: no hang
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file any more (replaced while being saved)", str(path))
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(paths) <= 1:
        for path in paths:
            one(path)
        return
    with ThreadPoolExecutor(max_workers=min(16, len(paths)), thread_name_prefix="telepathy-fsync") as pool:
        for future in [pool.submit(one, path) for path in paths]:
            future.result()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove_if_exists(tmp)
    write_file_durably(tmp, lambda f: f.write(data))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_symlink(link: str | os.PathLike, target: str) -> None:
    """Point symlink ``link`` at ``target`` (relative paths recommended), replacing it atomically."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    _remove_if_exists(tmp)
    os.symlink(target, tmp)
    pause_point("new symlink made, before it replaces the old")
    os.replace(tmp, link)
    fsync_dir(link.parent)


def publish_directory(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Rename a fully written, fsynced ``tmp_dir`` to ``final_dir`` and make the rename durable.

    Fails (FileExistsError / OSError) rather than replacing an existing ``final_dir``.
    """
    fsync_dir(tmp_dir)
    pause_point("directory complete, before the commit rename")
    final_dir = Path(final_dir)
    if final_dir.exists() or final_dir.is_symlink():
        raise FileExistsError(f"refusing to replace existing checkpoint directory {final_dir}")
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def _remove_if_exists(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
