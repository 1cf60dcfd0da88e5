"""The durability helpers against a file swapped for something else between the caller's check and the call: a
FIFO must neither hang a save's fsync nor a verification's read, and a save must not fsync what is not its file."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import xxhash

from telepathy.disk import durable


def _within(seconds: float, action):
    """Run ``action`` in a thread; fail (instead of hanging the suite) if it has not returned in ``seconds``."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as exc:  # noqa: BLE001 (reported to the test)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome


def test_files_written_for_later_become_durable_together_with_their_bytes(tmp_path):
    paths = [tmp_path / f"blob{i}" for i in range(20)]
    for i, path in enumerate(paths):
        assert durable.write_file_for_later(path, lambda f, i=i: f.write(bytes([i]) * 1000)) == 1000
    durable.fsync_together(paths)
    durable.fsync_together([tmp_path], directories=True)
    assert [p.read_bytes() for p in paths] == [bytes([i]) * 1000 for i in range(20)]
    with pytest.raises(FileExistsError):  # never overwrites: a name that exists is someone else's file
        durable.write_file_for_later(paths[0], lambda f: f.write(b"x"))


def test_a_fifo_swapped_in_before_the_fsync_is_an_error_not_a_hang(tmp_path):
    good, fifo = tmp_path / "good", tmp_path / "swapped"
    good.write_bytes(b"data")
    os.mkfifo(fifo)
    outcome = _within(10, lambda: durable.fsync_together([good, fifo]))
    error = outcome.get("error")
    assert isinstance(error, OSError) and error.errno == errno.EINVAL, outcome
    assert "not a regular file" in str(error)


def test_a_symlink_swapped_in_before_the_fsync_is_refused(tmp_path):
    target, link = tmp_path / "elsewhere", tmp_path / "blob"
    target.write_bytes(b"data")
    link.symlink_to(target)
    with pytest.raises(OSError) as raised:
        durable.fsync_together([link, tmp_path / "elsewhere"])
    assert raised.value.errno == errno.ELOOP


def test_hashing_a_fifo_swapped_in_after_the_check_returns_instead_of_blocking(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    outcome = _within(10, lambda: durable.hash_file(fifo))
    assert outcome.get("value") == xxhash.xxh3_128(b"").hexdigest(), outcome  # so it cannot match a real file


def test_hash_file_is_the_hash_of_the_bytes_across_buffer_boundaries(tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert durable.hash_file(path) == xxhash.xxh3_128(data).hexdigest()
