"""Training-loop helper: everything a loop needs to save and resume exactly, in one object.

    ckpt = Checkpointer(save_dir, parts={"model": model}, optimizer=opt, signature={"batch_size": 8, ...})
    state = ckpt.resume()                      # fresh TrainState when there is nothing to resume
    with ckpt.emergency_guard(state):
        ...                                    # after each optimizer step: state.advance(...)
        if ckpt.step_boundary(state, interval=300):
            sys.exit(training_signals.exit_code())

What goes where: each entry of ``parts`` -> ``<name>.pt`` (its state_dict), optimizer + LR scheduler +
GradScaler -> ``optimizer.pt``, position + RNG + run signature + metadata -> ``state.pt``, written last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from telepathy import rng, training_signals
from telepathy.checkpoint_store import CheckpointStore, CheckpointWriteError
from telepathy.manifest import CheckpointInvalid, verify_directory
from telepathy.retention import RetentionPolicy
from telepathy.train_state import (
    ResumeMismatchError,
    TrainState,
    check_signature,
    run_metadata,
    state_from_dict,
    state_to_dict,
)

log = logging.getLogger("telepathy")

OPTIMIZER_PART = "optimizer"
STATE_PART = "state"
_RESERVED = {OPTIMIZER_PART, STATE_PART}


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class Checkpointer:
    """Saves and restores a training run through a :class:`CheckpointStore`.

    ``signature`` holds the settings that must match on resume (world size, batch size, gradient
    accumulation, seed, ...); a mismatch raises :class:`ResumeMismatchError` before anything is loaded.
    ``generators`` are extra ``torch.Generator`` objects whose state is saved with the global RNGs.
    ``on_save(path, reason, seconds)`` is called after each commit (e.g. to record an event), and
    ``on_save_error(reason, message)`` after a save that failed with an I/O error (the loop goes on).
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
        retention: RetentionPolicy | None = None,
        args: Mapping[str, Any] | None = None,
        on_save: Callable[[Path, str, float], None] | None = None,
        on_save_error: Callable[[str, str], None] | None = None,
    ) -> None:
        clash = _RESERVED & set(parts)
        if clash:
            raise ValueError(f"part names {sorted(clash)} are reserved for the optimizer and training state")
        self.store = CheckpointStore(save_dir, retention)
        self.parts = dict(parts)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.generators = dict(generators or {})
        self.signature = dict(signature or {})
        self.metadata = run_metadata(args)
        self.on_save = on_save
        self.on_save_error = on_save_error
        self.store.prepare()

    def close(self) -> None:
        """Release the save dir for another writer (a process's lock also ends when it exits)."""
        self.store.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ save
    def _files(self, state: TrainState) -> dict[str, Any]:
        files: dict[str, Any] = {name: part.state_dict() for name, part in self.parts.items()}
        files[OPTIMIZER_PART] = {
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        rng_state = rng.capture_rng_state(self.generators)
        files[STATE_PART] = state_to_dict(state, rng_state, self.signature, self.metadata)
        return files

    def save(self, state: TrainState, reason: str, metric: float | None = None) -> Path:
        """Commit a checkpoint of the current training state; returns its directory."""
        info = {
            "reason": reason,
            "epoch": state.epoch,
            "batch_idx": state.batch_idx,
            "metric": metric,
            "telepathy_version": self.metadata["telepathy_version"],
            "hostname": self.metadata["hostname"],
        }
        started = time.monotonic()
        path = self.store.save(state.global_step, self._files(state), info)
        training_signals.mark_checkpoint_saved()
        log.info("checkpoint committed: %s (reason: %s)", path, reason)
        if self.on_save is not None:
            self.on_save(path, reason, time.monotonic() - started)
        return path

    def step_boundary(self, state: TrainState, interval: float | None = None, metric: float | None = None) -> bool:
        """Call after each optimizer step. Saves when a signal asked or the interval passed; returns True
        when the run must stop now (its exit code is ``training_signals.exit_code()``)."""
        reason = training_signals.save_reason()
        if training_signals.should_save_checkpoint(interval):
            try:
                self.save(state, reason, metric)
            except CheckpointWriteError as exc:  # disk full, I/O error: the previous checkpoint stands
                stopping = training_signals.should_exit_training()
                log.error("%s. %s", exc, "Exiting anyway; the run will resume from the previous checkpoint."
                          if stopping else "Training continues; the next save is due in one interval.")  # fmt: skip
                training_signals.mark_checkpoint_saved()  # retry after an interval, not at every step
                if self.on_save_error is not None:
                    self.on_save_error(reason, str(exc))
        return training_signals.should_exit_training()

    def save_emergency(self, state: TrainState, error: BaseException) -> Path | None:
        """Best-effort checkpoint after an unexpected exception. It goes to ``SAVE_DIR/emergency/`` and is
        never resumed automatically (the failure may have struck mid-step); resume from it by hand."""
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
    def resume(self, resume_from: str | os.PathLike | None = None, *, strict: bool = False) -> TrainState:
        """Restore the newest valid checkpoint (or ``resume_from``) into the parts, optimizer, scheduler,
        scaler and RNGs; return its TrainState, or a fresh one when there is nothing to resume.

        ``strict``: when the newest committed checkpoint fails verification, raise instead of falling back to
        an older one (an operator who would rather look than silently replay)."""
        if resume_from is not None:
            directory = Path(resume_from)
            verify_directory(directory)
        elif strict and self.store.committed():
            directory = self.store.committed()[-1].path
            try:
                verify_directory(directory)
            except CheckpointInvalid as exc:
                raise CheckpointInvalid(
                    exc.directory,
                    exc.file,
                    f"{exc.reason}; strict resume refuses to fall back to an older "
                    "checkpoint (check the disk, then resume without --strict_resume to replay from the previous one)",
                ) from None
        else:
            found = self.store.newest_valid()
            if found is None:
                log.info("no checkpoint in %s; starting from scratch", self.store.save_dir)
                return TrainState()
            directory = found[0].path
        saved_state = self.store.load_part(directory, STATE_PART)
        check_signature(saved_state.get("signature", {}), self.signature, str(directory))
        state = state_from_dict(saved_state)
        loaded = {name: self.store.load_part(directory, name) for name in self.parts}
        for name, part in self.parts.items():
            _check_shapes(name, part.state_dict(), loaded[name], directory)
        opt = self.store.load_part(directory, OPTIMIZER_PART)
        # Order matters: weights, then optimizer (its state is cast to the parameters' devices), then the
        # scheduler (which reads optimizer param groups), then the scaler, and the RNGs last, after any
        # construction work that could have drawn random numbers.
        for name, part in self.parts.items():
            part.load_state_dict(loaded[name])
        for obj, key in ((self.optimizer, "optimizer"), (self.scheduler, "scheduler"), (self.scaler, "scaler")):
            if obj is not None:
                if opt.get(key) is None:
                    raise ValueError(f"{directory}/optimizer.pt has no {key} state but this run has a {key}")
                obj.load_state_dict(opt[key])
        rng.restore_rng_state(saved_state["rng"], self.generators)
        training_signals.mark_checkpoint_saved()
        log.info(
            "resumed from %s: epoch %d, batch %d, global step %d",
            directory,
            state.epoch,
            state.batch_idx,
            state.global_step,
        )
        return state


def _check_shapes(name: str, current: Mapping[str, Any], saved: Mapping[str, Any], directory: Path) -> None:
    """Refuse, before anything is loaded, a part whose tensors differ in name or shape from this run's."""
    problems = [f"missing in checkpoint: {k}" for k in current.keys() - saved.keys()]
    problems += [f"not in this model: {k}" for k in saved.keys() - current.keys()]
    for key in current.keys() & saved.keys():
        a, b = current[key], saved[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            problems.append(f"{key}: checkpoint has shape {tuple(b.shape)}, this model has {tuple(a.shape)}")
    if problems:
        raise ResumeMismatchError(
            f"cannot resume part {name!r} from {directory}/{name}.pt: it does not fit this model:\n  "
            + "\n  ".join(sorted(problems)[:20])
            + "\nResume with the same model configuration, or use a new --save_dir."
        )
