"""The Lightning callback that makes a ``Trainer`` preemption-safe (started by :func:`fit_preemptible`).

At every optimizer step's end (``on_train_batch_end``) it records the position and calls the
:class:`~telepathy.checkpointer.Checkpointer`'s step boundary: ranks agree there, a signal's save or a periodic one
is committed there (never in a signal handler), and after SIGTERM/SIGINT training ends with
:class:`TrainingStopped`.

Validation during training. Lightning's resume skips a validation that was due right after the saved step, so:
validation runs with the RNG states put back afterwards (like Lightning's sanity check), and validation loaders
get their own generator, so running it or not leaves training's random streams alone; a save that goes on training
waits until after that validation (its metrics reach ReduceLROnPlateau, EarlyStopping, ModelCheckpoint first); a
stop saves before it (the grace period matters more), and says that validation-driven state may then differ.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn

from telepathy import distributed, restore, rng, training_signals
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import ResumeMismatchError, TelepathyError, UsageError
from telepathy.lightning.checkpoints import LIGHTNING, LightningCheckpointer
from telepathy.lightning.data import prepare_eval_loader, prepare_train_loader
from telepathy.options import CheckpointOptions, wrapper_resume_flags
from telepathy.save_policy import Requests
from telepathy.train_state import TrainState, check_shapes

log = logging.getLogger("telepathy")


class TrainingStopped(SystemExit):
    """Ends ``trainer.fit`` at the step boundary where a stop signal's checkpoint was committed (or failed: 98).
    A ``SystemExit``: Lightning tears down as for its own SIGTERM handling, and its ``code`` is the exit code."""


class PreemptionCallback(pl.Callback):
    """Saves through telepathy at step boundaries and resumes exactly; use it through :func:`fit_preemptible`.

    ``save_dir``: the run's telepathy save dir. ``seed``: the data order's seed (default: ``PL_GLOBAL_SEED``, which
    ``seed_everything`` sets, else 0). ``allow_inexact_data``: warn instead of refusing a training DataLoader whose
    order telepathy cannot resume exactly. Other keywords (``interval``, ``every_steps``, ``keep_last``, ``format``,
    ``async_save``, ...) or ``options=CheckpointOptions(...)``: when to save and what to keep."""

    def __init__(self, save_dir: str | os.PathLike, *, seed: int | None = None, allow_inexact_data: bool = False,
                 options: CheckpointOptions | None = None, **option_fields: Any) -> None:  # fmt: skip
        self.save_dir = Path(save_dir)
        self.options = CheckpointOptions.resolve(options, option_fields)  # bad values fail here, before training
        self.seed = seed
        self.allow_inexact_data = allow_inexact_data
        self.ckpt: LightningCheckpointer | None = None
        self.state = TrainState()
        self.armed = False  # set by fit_preemptible, which resumes and returns the exit code
        self._signals: dict[int, Any] = {}
        self._resumed_rng: dict[str, Any] | None = None
        self._start: tuple[int, int] | None = None  # (epoch, batch) the training data must resume at
        self._last_step = 0
        self._deferred = False
        self._metric: float | None = None
        self._rng_before_validation: dict[str, Any] | None = None
        self._training = False  # on_train_start came: a failure from now on may deserve an emergency checkpoint
        self._final_step: int | None = None

    # ------------------------------------------------------------------------------------------------ set-up
    def resume_wanted(self) -> bool:
        """Whether ``fit`` must resume (a committed checkpoint, or a wrapper's --resume_from)."""
        return bool(SaveDir(self.save_dir).committed() or wrapper_resume_flags()[0])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not self.armed:
            raise UsageError("PreemptionCallback works through telepathy.lightning.fit_preemptible(trainer, "
                             "model, ...) instead of trainer.fit: it resumes from the save dir and returns the "
                             "exit code")  # fmt: skip
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", "0")) if self.seed is None else self.seed
        signature = {"integration": "lightning", "world_size": trainer.world_size, "seed": self.seed,
                     "accumulate_grad_batches": trainer.accumulate_grad_batches,
                     "precision": str(trainer.precision)}  # fmt: skip
        dump = functools.partial(trainer._checkpoint_connector.dump_checkpoint, weights_only=False)
        check = functools.partial(_fits_module, pl_module)
        self.ckpt = LightningCheckpointer(self.save_dir, dump, check, signature=signature, options=self.options)
        # Lightning installs its own SIGTERM handler (it logs, signals child processes and, under DDP, broadcasts
        # from inside the handler) just before training; put telepathy's flag-only handlers straight back.
        self._signals = {s: signal.getsignal(s) for s in training_signals.handled_signals()}
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            register = connector.register_signal_handlers

            def register_then_reclaim() -> None:
                register()
                self._reclaim_signals()

            connector.register_signal_handlers = register_then_reclaim
        # Every DataLoader Lightning prepares passes through the strategy: the training one gets the resumable order
        # there, before Lightning creates its iterator (DataLoader workers take their first indices at once).
        original = trainer.strategy.process_dataloader
        trainer.strategy.process_dataloader = functools.partial(self._process_dataloader, trainer, original)

    def _reclaim_signals(self) -> None:
        for signum, handler in self._signals.items():
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)

    def resume(self) -> dict[str, Any]:
        """Load the newest usable checkpoint (through fit_preemptible's ``ckpt_path``); returns Lightning's dict,
        which Lightning then restores (weights, optimizers, schedulers, loops, callbacks)."""
        assert self.ckpt is not None, "resume() runs inside trainer.fit, after setup()"
        self.state, checkpoint, _ = self.ckpt.resume_lightning()
        if checkpoint is None:
            raise ResumeMismatchError(f"{self.save_dir} has no checkpoint to resume from any more")
        self._resumed_rng = rng.capture_rng_state()  # put back at on_train_start, after Lightning's set-up
        self._start = (self.state.epoch, self.state.batch_idx)
        self._last_step = self.state.global_step
        return checkpoint

    def _process_dataloader(self, trainer: pl.Trainer, original: Callable[[Any], Any], dataloader: Any) -> Any:
        dataloader = original(dataloader)
        if not trainer.training:  # validation: never draw from the global RNG (a skipped run must not matter)
            prepare_eval_loader(dataloader, self.seed)
            return dataloader
        epoch, batch = self._start if self._start is not None else (trainer.current_epoch, 0)
        facts = prepare_train_loader(dataloader, seed=self.seed, epoch=epoch, start_batch=batch,
                                     allow_inexact=self.allow_inexact_data,
                                     default_worker_init=_lightning_worker_init(trainer))  # fmt: skip
        saved = self.state.extra.get("data")
        if facts is not None and saved is not None and dict(saved) != facts:
            raise ResumeMismatchError(f"cannot resume from {self.save_dir}: the training data changed (checkpoint: "
                                      f"{dict(saved)}, this run: {facts}); resume with the same data and batch size, "
                                      "or use a new save_dir")  # fmt: skip
        if facts is not None:
            self.state.extra["data"] = facts
        return dataloader

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reclaim_signals()
        self._start = None  # the training data was prepared (setup_data); a reload starts its epoch at batch 0
        self._training = True
        if self._resumed_rng is None and trainer.global_step != self.state.global_step:
            raise UsageError(f"Lightning resumed at step {trainer.global_step} from a checkpoint of its own "
                             "(ckpt_path='last' or 'hpc', OnExceptionCheckpoint) but telepathy's save dir "
                             f"{self.save_dir} has none: telepathy resumes only from its save dir, whose data "
                             "position and RNGs it knows; remove the other checkpoint or use it by hand")  # fmt: skip
        if self._resumed_rng is not None:  # the RNGs as the checkpoint left them, after whatever set-up drew
            rng.restore_rng_state(self._resumed_rng)
            self._resumed_rng = None
            if trainer.global_step != self.state.global_step:
                raise RuntimeError(f"Lightning restored step {trainer.global_step} but telepathy's state is "
                                   f"at step {self.state.global_step}; this Lightning version restores "
                                   "differently")  # fmt: skip

    # ----------------------------------------------------------------------------------------- boundaries
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step == self._last_step:
            return  # gradient accumulation: no optimizer step in this batch, not a boundary
        self._last_step = self.state.global_step = trainer.global_step
        if batch_idx + 1 >= trainer.num_training_batches:
            self.state.epoch, self.state.batch_idx = trainer.current_epoch + 1, 0
        else:
            self.state.epoch, self.state.batch_idx = trainer.current_epoch, batch_idx + 1
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._metric = float(loss.detach()) if isinstance(loss, torch.Tensor) else None
        if self._metric is not None:
            self.state.best_loss = min(self.state.best_loss, self._metric)
        if 0 <= trainer.max_steps <= trainer.global_step:  # max_steps ends training, maybe mid-epoch: the final
            self._boundary()  # checkpoint is taken here, because at on_train_end Lightning already counts the
            self._save_final()  # unfinished epoch as done and a longer run resumed from it would skip its rest
            return
        self._deferred = _validation_follows(trainer) and not self._stop_asked()
        if not self._deferred:
            self._boundary()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._rng_before_validation = rng.capture_rng_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng_before_validation is not None:  # training continues as if this validation had drawn nothing
            rng.restore_rng_state(self._rng_before_validation)
            self._rng_before_validation = None
        if self._deferred and not trainer.sanity_checking:
            self._deferred = False
            self._boundary()

    def _stop_asked(self) -> bool:
        """Whether any rank has a stop signal (one all-reduce; only before a validation, so all ranks ask)."""
        asked = Requests(exit_signum=training_signals.exit_signal() or 0)
        agreed = distributed.agree(asked) if self.ckpt is not None and self.ckpt.collective else asked
        if agreed.exit_signum and self.ckpt is not None and self.ckpt.rank == 0:
            log.warning("stopping before the validation due after step %d: the resumed run skips it, as Lightning "
                        "does; state that only validation changes (ReduceLROnPlateau, EarlyStopping) may then differ "
                        "from an uninterrupted run", self.state.global_step)  # fmt: skip
        return bool(agreed.exit_signum)

    def _boundary(self) -> None:
        assert self.ckpt is not None
        if self.ckpt.step_boundary(self.state, metric=self._metric):
            raise TrainingStopped(training_signals.exit_code())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._final_step != self.state.global_step:
            self._save_final()

    def _save_final(self) -> None:
        assert self.ckpt is not None
        best = None if self.state.best_loss == float("inf") else self.state.best_loss
        self.ckpt.save(self.state, "final", best)
        self._final_step = self.state.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failure during training: an emergency checkpoint (never resumed automatically). Not for a stop
        (SystemExit), Ctrl+C without handlers, or a refusal of telepathy's before the first step."""
        failed = isinstance(exception, Exception) and not isinstance(exception, TelepathyError)
        if self.ckpt is not None and failed and self._training:
            self.ckpt.save_emergency(self.state, exception)

    def close(self, trainer: pl.Trainer) -> None:
        """After fit (fit_preemptible calls it, whatever happened): wait for a background save, release the save
        dir, and give the strategy back its own ``process_dataloader``."""
        vars(trainer.strategy).pop("process_dataloader", None)
        if self.ckpt is not None:
            self.ckpt.close()


def _fits_module(pl_module: pl.LightningModule, checkpoint: dict[str, Any], directory: Path) -> None:
    """The saved weights are tensors where the module has tensors, and (unless the module loads non-strictly) the
    same names and shapes: a clear refusal before Lightning's ``load_state_dict`` would fail half-way."""
    this_module = pl_module.state_dict()
    restore.check_tensors(this_module, checkpoint["state_dict"])
    if pl_module.strict_loading:
        check_shapes(LIGHTNING, this_module, checkpoint["state_dict"], directory)


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning runs a validation right after this batch (its own test, which every rank answers alike)."""
    check = getattr(trainer.fit_loop.epoch_loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    return bool(check is not None and fetcher is not None and check(fetcher))


def _lightning_worker_init(trainer: pl.Trainer) -> Callable[[int], Any] | None:
    """Lightning's own worker seeding (``seed_everything(workers=True)``), which it adds only to loaders that have no
    ``worker_init_fn``: telepathy's signal-ignoring one runs it."""
    if os.environ.get("PL_SEED_WORKERS") != "1":
        return None
    from lightning.fabric.utilities.seed import pl_worker_init_function  # noqa: PLC0415

    return functools.partial(pl_worker_init_function, rank=trainer.global_rank)
