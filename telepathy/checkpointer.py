"""Training-loop helper: everything a loop needs to save and resume exactly, in one object.

    ckpt = Checkpointer(save_dir, parts={"model": model}, optimizer=opt, signature={"batch_size": 8, ...})
    state = ckpt.resume()                      # fresh TrainState when there is nothing to resume
    with ckpt.emergency_guard(state):
        ...                                    # after each optimizer step: state.advance(...)
        if ckpt.step_boundary(state):          # saves when a signal asked or the options' interval passed
            sys.exit(training_signals.exit_code())

How often, what to keep and in which format: :class:`~telepathy.options.CheckpointOptions` (``options=`` or its
fields by name, e.g. ``Checkpointer(d, parts=..., interval=300, async_save=True)``); when: its
:class:`~telepathy.save_policy.SavePolicy`.

What goes where: each entry of ``parts`` -> ``<name>.pt`` (its state_dict), optimizer + LR scheduler +
GradScaler -> ``optimizer.pt``, position + RNG + run signature + metadata -> ``state.pt``, written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from telepathy import distributed, restore, rng, training_signals
from telepathy.disk.contents import OPTIMIZER, RESERVED_PARTS, STATE
from telepathy.disk.events import RunRecorder
from telepathy.errors import CheckpointWriteError, UsageError
from telepathy.module_state import LiveOptimizerState, LiveStateDicts
from telepathy.options import SAVE_DIR_ENV, CheckpointOptions, wrapper_resume_flags
from telepathy.save_policy import SavePolicy, check_interval
from telepathy.step_log import STEP_LOG_ENV, record_step
from telepathy.store import collective, step_snapshots
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.store.snapshot import HostBuffers
from telepathy.train_state import (
    FixedConstants,
    TrainState,
    run_metadata,
    state_to_dict,
)

log = logging.getLogger("telepathy")

OPTIMIZER_PART = OPTIMIZER  # older names
STATE_PART = STATE


@dataclass(frozen=True)
class SaveReport:
    path: Path
    step: int
    reason: str
    seconds: float  # from the start of the save to its commit
    blocked_seconds: float | None  # async saves: how long the training loop waited (the snapshot)
    epoch: int | None = None


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class Checkpointer:
    """Saves and restores a training run through a :class:`CheckpointStore`.

    ``signature`` holds the settings that must match on resume (world size, batch size, gradient
    accumulation, seed, ...); a mismatch raises :class:`ResumeMismatchError` before anything is loaded.
    ``generators`` are extra ``torch.Generator`` objects whose state is saved with the global RNGs.
    ``on_save(SaveReport)`` is called after each commit (e.g. to record an event), and
    ``on_save_error(reason, message)`` after a save that failed with an I/O error (the loop goes on).
    ``options`` (:class:`CheckpointOptions`, or its fields as keyword arguments): the interval or step count
    between saves, retention, the format and ``async_save`` — periodic and SIGUSR1 saves from ``step_boundary``
    then block only for a copy of the state into reusable host buffers and commit in a background thread;
    ``save()`` and saves before an exit stay durable before they return. Format ``differential``: tensors
    unchanged since a kept checkpoint are not written again; ``compressed``: also zstd over byte planes (see
    :mod:`telepathy.store.blobs`).

    Under ``torch.distributed`` every rank constructs a Checkpointer on the same save dir and calls
    ``step_boundary`` after each step: the ranks agree on signals there (every ``agree_every`` steps), save
    together (rank 0 writes replicated parts and commits after every rank's ``rank_<r>.pt`` — its RNG — is
    durable) and stop together. Format ``sharded`` (FSDP2/DTensor parts): parts and optimizer go through
    ``torch.distributed.checkpoint`` and may be resumed on another world size.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        *,
        parts: Mapping[str, Stateful],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        signature: Mapping[str, Any] | None = None,
        options: CheckpointOptions | None = None,
        args: Mapping[str, Any] | None = None,
        on_save: Callable[[SaveReport], None] | None = None,
        on_save_error: Callable[[str, str], None] | None = None,
        record_events: bool = True,
        **option_fields: Any,
    ) -> None:
        clash = RESERVED_PARTS & set(parts)
        if clash:
            raise UsageError(f"part names {sorted(clash)} are reserved for the optimizer and training state")
        self.options = options = CheckpointOptions.resolve(options, option_fields)
        self.rank, self.world_size = distributed.rank_and_world_size()
        self.sharded = options.format == "sharded"
        self.collective = distributed.is_distributed() or self.sharded
        if self.collective and options.async_save:
            raise UsageError("async_save is not supported with several ranks or sharded state yet; "
                             "drop --async_save (saves stay synchronous and durable)")  # fmt: skip
        if self.sharded and not all(isinstance(p, nn.Module) for p in parts.values()):
            raise UsageError("format 'sharded' needs every part to be an nn.Module (its state goes through DCP)")
        if not training_signals.installed() and threading.current_thread() is threading.main_thread():
            training_signals.install_signal_handlers()  # an unprotected loop must not be possible to miss
            training_signals.say("installed signal handlers (SIGTERM, SIGINT, SIGHUP: save and stop; SIGUSR1: save); "
                                 "install them first thing in your script to cover its start-up too")  # fmt: skip
        self.policy = SavePolicy(options.interval, options.every_steps, options.agree_every)
        self.recorder = RunRecorder(save_dir) if record_events and self.rank == 0 else None
        self.store = CheckpointStore(save_dir, options.retention(), differential=options.uses_blobs,
                                     compress=options.format == "compressed")  # fmt: skip
        self.parts = dict(parts)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.generators = dict(generators or {})
        self.signature = dict(signature or {})
        self.metadata = run_metadata(args)
        self._fixed_constants = FixedConstants()  # (what a per-step snapshot takes of signature and metadata)
        self.on_save = on_save
        self.on_save_error = on_save_error
        self.async_save = options.async_save
        self._buffers = HostBuffers()
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._prepare_store()
        watched = os.environ.get(SAVE_DIR_ENV)
        if watched and Path(watched) != self.store.save_dir.resolve():
            log.warning("the supervising wrapper watches %s but this Checkpointer writes to %s: give both the same "
                        "directory, or the wrapper's status, lock check and rescue look in the wrong place",
                        watched, self.store.save_dir)  # fmt: skip
        self._live_parts = LiveStateDicts()  # (a part's state dict for the snapshot, kept while unchanged)
        self._live_optimizer = LiveOptimizerState()  # (alike)
        self._snapshots = step_snapshots.from_environment(options.snapshot_every_step, self.collective)
        self._options_record = dataclasses.asdict(options)  # what a snapshot says of the store (made once)
        self._resolved_save_dir = str(Path(save_dir).resolve())

    def _prepare_store(self) -> None:
        """Rank 0 takes the save dir (lock, clean-up); the other ranks learn whether it could."""
        problem: BaseException | None = None
        if self.rank == 0:
            try:
                self.store.prepare()
            except Exception as exc:
                problem = exc
        if distributed.is_distributed():
            message = distributed.broadcast_from_rank0(None if problem is None else f"{problem}")
            if message is not None and problem is None:
                raise RuntimeError(f"rank 0 could not take the save dir: {message}")
        if problem is not None:
            raise problem

    def close(self) -> None:
        """Wait for a background save, then release the save dir for another writer (a process's lock also
        ends when it exits)."""
        self.wait()
        if self._snapshots is not None:  # (its copy thread and slot mappings; a later step maps them again)
            self._snapshots.close()
        self.store.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ save
    def _files(self, state: TrainState, live: bool = False, user_code_done: Callable[[], None] | None = None
               ) -> dict[str, Any]:  # fmt: skip
        """The files rank 0 writes: parts, optimizer and state (in sharded mode only scheduler, scaler and
        state: parts and optimizer are in the DCP shards). ``live``: a module's parameters themselves, not
        detached aliases (a per-step snapshot copies them at once; the detaches were a tenth of its cost), and
        Python's RNG state packed (:class:`telepathy.rng.PackedInts`). ``user_code_done`` is called once no code
        of the user's (state-dict hooks and overrides, schedulers, pickled metadata) is left to run."""
        files: dict[str, Any] = {}
        for name, part in {} if self.sharded else self.parts.items():
            files[name] = self._live_parts(name, part) if live else part.state_dict()
        optimizer = None
        if self.optimizer and not self.sharded:
            optimizer = self._live_optimizer(self.optimizer) if live else self.optimizer.state_dict()
        if live:  # (what the snapshot kept of a part or optimizer no longer here is let go)
            self._live_parts.retain({} if self.sharded else self.parts)
            if optimizer is None:
                self._live_optimizer.forget()
        files[OPTIMIZER] = {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        constants = self._fixed_constants.get(self.signature, self.metadata) if live else None
        if user_code_done is not None:
            user_code_done()
        rng_state = rng.capture_rng_state(self.generators, packed=live)
        files[STATE] = state_to_dict(state, rng_state, self.signature, self.metadata, constants)
        return files

    def save(
        self, state: TrainState, reason: str, metric: float | None = None, *, blocking: bool = True
    ) -> Path | None:
        """Commit a checkpoint of the current training state and return its directory. ``blocking=False``
        (what ``step_boundary`` uses with ``async_save``) returns None once the state is copied to host
        buffers; the commit, and ``latest``, follow in the background. Never two saves at once."""
        info = self._info(state, reason, metric)
        self.wait()
        started = time.monotonic()
        if self.collective:  # every rank: its RNG file, its shards; rank 0 commits once all are durable
            path = collective.save_collectively(
                self.store, state.global_step, {**info, "sharded": self.sharded},
                replicated=lambda: self._files(state),
                per_rank={"rank": self.rank, "rng": rng.capture_rng_state(self.generators)},
                sharded=self._write_shards if self.sharded else None,
            )  # fmt: skip
        elif blocking:
            path = self.store.save(state.global_step, self._files(state), info)
        if self.collective or blocking:
            self.policy.saved()
            self._report(SaveReport(path, state.global_step, reason, time.monotonic() - started, None, state.epoch))
            return path
        snapshot = self._buffers.snapshot(self._files(state))
        self.policy.saved()
        blocked = time.monotonic() - started
        self._writer = threading.Thread(target=self._write_in_background, name="telepathy-checkpoint-writer",
                                        args=(state.global_step, snapshot, info, reason, started, blocked))  # fmt: skip
        self._writer.start()  # not a daemon: an exiting interpreter waits for the commit
        return None

    def _info(self, state: TrainState, reason: str, metric: float | None) -> dict[str, Any]:
        """What the manifest says about a checkpoint besides its files."""
        meta = self.metadata
        return {"reason": reason, "epoch": state.epoch, "batch_idx": state.batch_idx,
                "metric": None if metric is None else float(metric),  # a 0-d tensor or numpy scalar is fine too
                "telepathy_version": meta["telepathy_version"], "hostname": meta["hostname"]}  # fmt: skip

    def _write_shards(self, tmp: Path) -> list[Path]:
        from telepathy.store import sharded  # noqa: PLC0415 (DCP takes ~1.5 s to import; only sharded runs pay)

        return sharded.save_parts(self.parts, self.optimizer, tmp, self.rank)

    def _write_in_background(self, step: int, files: dict[str, Any], info: dict[str, Any], reason: str,
                             started: float, blocked: float) -> None:  # fmt: skip
        try:
            path = self.store.save(step, files, info)
        except CheckpointWriteError as exc:
            self._save_failed(reason, exc)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._writer_error = exc
        else:
            self._report(SaveReport(path, step, reason, time.monotonic() - started, blocked, info.get("epoch")))

    def _writing(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def wait(self) -> None:
        """Block until a background save is committed (re-raising what went wrong in it, other than I/O)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error is not None:
            error, self._writer_error = self._writer_error, None
            raise error

    def _record(self, kind: str, **fields: Any) -> None:
        if self.recorder is not None:  # SAVE_DIR/events.jsonl, for `python -m telepathy status` and `plot`
            self.recorder.emit(kind, **fields)

    def _report(self, report: SaveReport) -> None:
        log.info("checkpoint committed: %s (reason: %s)", report.path, report.reason)
        size = sum(f.stat().st_size for f in report.path.iterdir())
        self._record("save", step=report.step, epoch=report.epoch, reason=report.reason, path=str(report.path),
                     bytes=size, seconds=round(report.seconds, 3))  # fmt: skip
        if self.on_save is not None:
            self.on_save(report)

    def _save_failed(self, reason: str, exc: CheckpointWriteError) -> None:
        stopping = training_signals.should_exit_training()
        if stopping:
            training_signals.mark_stop_unsaved()  # exit 98: nothing new saved for this stop
        then = "Exiting with code 98 (nothing new saved): the next run resumes from the previous checkpoint."
        log.error("%s. %s", exc, then if stopping else "Training continues; the next save is due in one interval.")
        self.policy.saved()  # retry after an interval, not at every step
        self._record("save_failed", reason=reason, error=str(exc))
        if self.on_save_error is not None:
            self.on_save_error(reason, str(exc))

    def step_boundary(self, state: TrainState, interval: float | None = None, metric: float | None = None) -> bool:
        """Call after each optimizer step. Saves when the save policy says so (a signal asked, the interval
        passed, the step count came round); returns True when the run must stop now (its exit code is
        ``training_signals.exit_code()``). With ``async_save`` only the copy to host buffers blocks, except before
        an exit: that save is durable before it returns. Under ``torch.distributed``: call it on every rank; they
        agree first and act together. ``interval`` (seconds) replaces the options' interval from now on."""
        if self.recorder is not None:
            self.recorder.step(state.global_step, state.epoch, None if metric is None else float(metric))
        if STEP_LOG_ENV in os.environ:  # telepathy check-resume compares every step's metric, to the last bit
            record_step(os.environ[STEP_LOG_ENV], state.global_step, metric)
        if self._snapshots is not None:  # what the supervisor commits if this process dies before the next step
            info = self._info(state, "rescue", metric)
            try:  # (a big state's copy begins in a thread once no user code is left to run: see StepSnapshots)
                files = self._files(state, live=True, user_code_done=self._snapshots.start_copy)
            except BaseException:
                self._snapshots.settle()  # no copy outlives a step boundary
                raise
            self._snapshots.capture(state.global_step, files, info, self._options_record, self._resolved_save_dir)
        if interval is not None and interval != self.policy.interval:
            self.policy.interval = check_interval(interval)
        if not self.policy.decides_at(state.global_step):
            return False
        requests = self.policy.requests(state.global_step)
        decision = self.policy.decide(distributed.agree(requests) if self.collective else requests)
        blocking = not self.async_save or decision.stop
        if decision.save and not blocking and decision.reason in ("interval", "steps") and self._writing():
            pass  # latest wins: the loop never waits for the disk; the next step boundary takes a newer state
        elif decision.save:
            try:
                self.save(state, decision.reason, metric, blocking=blocking)
            except CheckpointWriteError as exc:  # disk full, I/O error: the previous checkpoint stands
                self._save_failed(decision.reason, exc)
        if decision.stop:
            self.wait()  # an exit waits for a save in flight
            code = training_signals.exit_code()
            saved = "nothing new saved" if code == training_signals.EXIT_STOPPED_UNSAVED else "checkpoint committed"
            training_signals.say(f"{training_signals.signal_name(training_signals.exit_signal())} at step "
                                 f"{state.global_step}: {saved}; stopping with exit code {code}")  # fmt: skip
            self._record("preempt", step=state.global_step, exit_code=training_signals.exit_code(),
                         signal=training_signals.signal_name(training_signals.exit_signal()))  # fmt: skip
        return decision.stop

    def save_emergency(self, state: TrainState, error: BaseException) -> Path | None:
        """Best-effort checkpoint after an unexpected exception. It goes to ``SAVE_DIR/emergency/`` and is
        never resumed automatically (the failure may have struck mid-step); resume from it by hand. With
        several ranks only rank 0's replicated state can be saved alone (the others may be gone)."""
        if self.collective and (self.sharded or self.rank != 0):
            log.error("training failed on rank %d with %r; no emergency checkpoint (sharded or not the writer); "
                      "the run resumes from the last committed checkpoint", self.rank, error)  # fmt: skip
            return None
        try:
            self.wait()
        except Exception as exc:  # a failed background save must not prevent the emergency one
            log.error("the background save before this failure had failed too: %r", exc)
        try:
            path = self.store.save(
                state.global_step,
                self._files(state),
                {"reason": "emergency", "error": repr(error)[:500], "epoch": state.epoch},
                emergency=True,
            )
        except Exception as exc:  # the original error matters more than this one
            log.error("emergency checkpoint failed: %r (after %r)", exc, error)
            return None
        log.error(
            "training failed with %r; emergency checkpoint saved to %s. It is not resumed automatically "
            "because the failure may have happened mid-step; to resume from it by hand, pass "
            "resume_from=%s (--resume_from on the command line).",
            error,
            path,
            path,
        )
        return path

    @contextlib.contextmanager
    def emergency_guard(self, state: TrainState) -> Iterator[TrainState]:
        """Run the loop body; on an unexpected exception, attempt an emergency save, then re-raise."""
        try:
            yield state
        except Exception as exc:
            self.save_emergency(state, exc)
            raise

    # ---------------------------------------------------------------------------------------- resume
    def resume(self, resume_from: str | os.PathLike | None = None, *, strict: bool = False,
               check: Callable[[TrainState], None] | None = None) -> TrainState:  # fmt: skip
        """Restore the newest usable checkpoint (or ``resume_from``) into the parts, optimizer, scheduler, scaler
        and RNGs; return its TrainState, or a fresh one when there is nothing to resume.

        A checkpoint that verifies but cannot be used (a file that does not load safely, a position ``check``
        rejects, a damaged blob) is skipped like a corrupt one and the next older one is tried. ``strict`` (and
        ``resume_from``): use that checkpoint or raise instead of falling back (an operator who would rather look
        than silently replay). A checkpoint made with other settings raises :class:`ResumeMismatchError`."""
        wrapper_from, wrapper_strict = wrapper_resume_flags()  # a supervising wrapper's --resume_from, --strict
        return self.resume_with(resume_from or wrapper_from, strict or wrapper_strict, check)[0]

    def resume_with(self, resume_from: str | os.PathLike | None, strict: bool,
                    check: Callable[[TrainState], None] | None = None,
                    read_more: Callable[[Path], Any] | None = None) -> tuple[TrainState, Any, Path | None]:  # fmt: skip
        """:meth:`resume`'s steps; ``read_more(directory)`` loads and checks what an integration keeps beside the
        parts (raising CheckpointInvalid makes the checkpoint unusable). Returns the state, what ``read_more``
        returned and the checkpoint used (None, None when starting from scratch)."""
        return restore.resume(self, resume_from, strict, check, read_more)
