"""Hugging Face ``transformers.Trainer`` with telepathy's guarantees: a signal saves at the step boundary and
the run exits 99; a resume continues exactly; checkpoints are durable and verified.

    trainer = Trainer(model=..., args=TrainingArguments(output_dir=...), train_dataset=...)
    sys.exit(train_preemptible(trainer))      # resumes from the newest sealed checkpoint-N, if any

Trainer writes ``checkpoint-N/`` in place, with no fsync and no commit marker, so a kill during a save leaves a
partial directory that ``get_last_checkpoint`` would pick. :class:`PreemptionCallback` seals each checkpoint
after Trainer wrote it (every file fsynced, a telepathy ``manifest.json`` with sizes and hashes, written last),
and only sealed checkpoints that verify are resumed from. Trainer restores the model, optimizer, scheduler,
RNG states and the data position itself (loading with ``weights_only=True``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from telepathy import training_signals
from telepathy.disk import durable
from telepathy.disk.catalog import first_valid
from telepathy.disk.manifest import MANIFEST_NAME, build_manifest, entry_for
from telepathy.disk.save_dir import CheckpointRef

log = logging.getLogger("telepathy")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class PreemptionCallback(TrainerCallback):
    """SIGTERM/SIGINT: save at this step boundary and stop; SIGUSR1: save and go on (the spec's signal
    table). Seals every checkpoint Trainer writes, whatever asked for it, and then applies ``keep_last`` (what
    :func:`train_preemptible` takes over from ``save_total_limit``: Trainer prunes before a new checkpoint is
    sealed, so a kill in between left nothing sealed to resume from)."""

    def __init__(self) -> None:
        self.sealed_step: int | None = None  # the step of the last checkpoint this run sealed
        self.keep_last: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if not training_signals.installed():
            training_signals.install_signal_handlers()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if training_signals.should_save_checkpoint(None):  # a signal asked (no interval: Trainer has save_steps)
            control.should_save = True
        if training_signals.should_exit_training():
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if args.should_save:  # the process that writes (rank 0)
            seal(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
            if self.keep_last:
                prune_sealed(Path(args.output_dir), self.keep_last, state.best_model_checkpoint)
        self.sealed_step = state.global_step
        training_signals.mark_checkpoint_saved()


def seal(directory: Path, step: int) -> None:
    """Make a checkpoint directory Trainer wrote durable and verifiable: fsync every file, then write the
    manifest (the commit marker) durably."""
    entries = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            entries.append(entry_for(path))
    manifest = build_manifest(entries, {"step": step, "reason": "hf_trainer", "emergency": False})
    durable.atomic_write_bytes(directory / MANIFEST_NAME, manifest)
    durable.fsync_dir(directory.parent)


def prune_sealed(output_dir: Path, keep_last: int, best: str | None) -> None:
    """Keep the newest ``keep_last`` sealed checkpoints (and Trainer's best one): remove the older sealed ones.
    Runs after a seal, so a sealed checkpoint is always left; a ``checkpoint-N`` without telepathy's seal (torn by a
    kill, or the user's own) is never removed."""
    sealed = sorted((r for r in _checkpoints(output_dir) if (r.path / MANIFEST_NAME).is_file()),
                    key=lambda r: r.step, reverse=True)  # fmt: skip
    for ref in sealed[keep_last:]:
        if not (best and Path(best).resolve() == ref.path.resolve()):
            shutil.rmtree(ref.path, ignore_errors=True)


def _checkpoints(output_dir: Path) -> list[CheckpointRef]:
    """Trainer's ``checkpoint-N`` directories (not links)."""
    return [CheckpointRef(int(m.group(1)), p) for p in (output_dir.iterdir() if output_dir.is_dir() else ())
            if (m := _CHECKPOINT.match(p.name)) and p.is_dir() and not p.is_symlink()]  # fmt: skip


def last_sealed_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-N`` that is sealed and verifies; unsealed or damaged ones are skipped with a
    warning (a save interrupted by a kill)."""
    newest = first_valid(sorted(_checkpoints(Path(output_dir)), key=lambda r: r.step, reverse=True))
    return None if newest is None else newest[0].path


def train_preemptible(trainer: Trainer) -> int:
    """Add the callback, resume from the newest sealed checkpoint (if any), train; return the exit code:
    0 when training finished (a signal after the last step included), 99 (130 after SIGINT) when a signal
    stopped it after a sealed save at the step it stopped, 98 when it stopped with nothing new saved."""
    training_signals.install_signal_handlers()
    callback = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PreemptionCallback)), None)
    if callback is None:
        callback = PreemptionCallback()
        trainer.add_callback(callback)
    limit, trainer.args.save_total_limit = trainer.args.save_total_limit, None  # pruned after sealing instead
    callback.keep_last = limit if limit and limit > 0 else None
    checkpoint = last_sealed_checkpoint(trainer.args.output_dir)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        trainer.args.save_total_limit = limit
    if not training_signals.should_exit_training():
        return training_signals.EXIT_COMPLETE
    state, name = trainer.state, training_signals.signal_name(training_signals.exit_signal())
    if state.max_steps > 0 and state.global_step >= state.max_steps:
        training_signals.say(f"{name} after the last step ({state.global_step}): training is complete; exit 0")
        return training_signals.EXIT_COMPLETE
    if callback.sealed_step != state.global_step:  # the stop came after the last save Trainer made
        training_signals.mark_stop_unsaved()
    code = training_signals.exit_code()
    saved = "checkpoint sealed" if code != training_signals.EXIT_STOPPED_UNSAVED else "nothing new saved"
    training_signals.say(f"{name} at step {state.global_step}: {saved}; stopping with exit code {code}")
    return code
