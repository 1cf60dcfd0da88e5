"""One checkpoint written by several ranks: every rank's files are durable before rank 0 commits.

    rank 0: begin (temporary directory) ──broadcast name──▶ every rank writes its files (fsynced)
    every rank ──gather (file entries, or its error)──▶ rank 0: commit (manifest + rename) or abort
    rank 0 ──broadcast outcome──▶ every rank returns the same path or raises the same error

A rank killed mid-save never reaches the gather, so rank 0 never commits: the temporary directory is removed as
stale by the next run and the previous checkpoint stays the resume point. On resume rank 0 decides which
checkpoint (it verifies) and broadcasts it, so every rank loads the same one.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from telepathy.disk.commit import PendingCheckpoint
from telepathy.disk.contents import rank_part
from telepathy.disk.manifest import FileEntry, entry_for
from telepathy.distributed import broadcast_from_rank0, gather_to_rank0, rank_and_world_size
from telepathy.errors import CheckpointInvalid, CheckpointWriteError
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.store.formats import write_part


def save_collectively(
    store: CheckpointStore,
    step: int,
    info: Mapping[str, Any],
    *,
    replicated: Callable[[], Mapping[str, Any]],
    per_rank: Mapping[str, Any],
    sharded: Callable[[Path], list[Path]] | None = None,
) -> Path:
    """Collective save. ``replicated()`` (called on rank 0 only) gives the parts written once; ``per_rank`` is
    this rank's ``rank_<r>.pt`` (RNG, data cursor); ``sharded(tmp)`` writes this rank's shards and returns
    them. Returns the committed directory on every rank, or raises the same error on every rank."""
    rank, world = rank_and_world_size()
    pending, problem = None, None
    if rank == 0:
        try:
            pending = store.begin(step)
        except OSError as exc:
            problem = _describe(exc)
    tmp_name, problem = broadcast_from_rank0((None if pending is None else str(pending.tmp), problem))
    if tmp_name is None:
        raise _error(problem)
    tmp = Path(tmp_name)
    mine = PendingCheckpoint.join(store.dir, step, tmp)  # this rank's files, reported to rank 0 below
    entries: list[FileEntry] = []
    error = None
    try:
        written = sharded(tmp) if sharded is not None else []
        entries = [entry_for(p) for p in written]
        entries.append(write_part(mine, rank_part(rank), dict(per_rank)))
        if pending is not None:
            store.write_parts(pending, replicated())
    except Exception as exc:  # told to rank 0, which then does not commit
        error = _describe(exc, rank)
    reports = gather_to_rank0((entries, error))
    outcome: tuple[str, Any] = ("ok", None)
    if pending is not None:
        failures = [e for _, e in reports if e is not None]
        try:
            if failures:
                raise _error(failures[0])
            final = store.commit(pending, {**info, "world_size": world}, [e for es, _ in reports for e in es])
            outcome = ("ok", str(final))
        except BaseException as exc:
            store.abort(pending, exc)
            outcome = ("error", failures[0] if failures else _describe(exc))
    outcome = broadcast_from_rank0(outcome)
    if outcome[0] == "error":
        raise _error(outcome[1])
    return Path(outcome[1])


def choose_on_rank0(decide: Callable[[], Path | None]) -> Path | None:
    """Run ``decide`` (find and verify the resume point) on rank 0 only; every rank gets its answer, or
    raises the error it raised."""
    rank, _ = rank_and_world_size()
    answer: tuple[str, Any] = ("ok", None)
    if rank == 0:
        try:
            found = decide()
            answer = ("ok", None if found is None else str(found))
        except CheckpointInvalid as exc:
            answer = ("invalid", (str(exc.directory), exc.file, exc.reason))
        except Exception as exc:  # exceptions may not pickle: the others get its message
            broadcast_from_rank0(("error", f"rank 0 could not choose a checkpoint: {exc}"))
            raise
    kind, value = broadcast_from_rank0(answer)
    if kind == "invalid":
        raise CheckpointInvalid(Path(value[0]), value[1], value[2])
    if kind == "error":
        raise RuntimeError(value)
    return None if value is None else Path(value)


def _describe(exc: BaseException, rank: int = 0) -> tuple[str, int | None]:
    """An error as (message, errno) — what crosses to other ranks (exceptions may not pickle)."""
    io = exc if isinstance(exc, OSError) else getattr(exc, "__context__", None)
    number = getattr(exc, "errno", None) or (io.errno if isinstance(io, OSError) else None)
    return (f"rank {rank}: {exc}" if rank else str(exc)), number


def _error(problem: tuple[str, int | None]) -> Exception:
    message, number = problem
    if number is not None:
        return CheckpointWriteError(message, OSError(number, errno.errorcode.get(number, "I/O error")))
    return RuntimeError(f"a rank failed while saving, nothing was committed: {message}")
