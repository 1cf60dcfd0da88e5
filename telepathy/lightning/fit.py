"""``fit_preemptible``: ``trainer.fit`` that resumes from telepathy's save dir and returns the exit code.

Lightning reads a checkpoint through its strategy's ``CheckpointIO``; :class:`ResumeIO` answers the read of the
save dir with telepathy's resume (ranks agree on the checkpoint, it is verified, loaded without running code, and
Lightning restores from its dict) and passes every other path to the IO it wraps.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

from telepathy import training_signals
from telepathy.errors import EXIT_COMPLETE, TelepathyError, UsageError, describe
from telepathy.lightning.callback import PreemptionCallback, TrainingStopped

log = logging.getLogger("telepathy")


class ResumeIO(CheckpointIO):
    """The strategy's CheckpointIO while ``fit_preemptible`` runs: a load of the save dir is telepathy's resume."""

    def __init__(self, callback: PreemptionCallback, inner: CheckpointIO) -> None:
        self.callback, self.inner = callback, inner

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(path) == self.callback.save_dir:
            return self.callback.resume()
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)  # ModelCheckpoint and co.

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def check_trainer(trainer: pl.Trainer) -> None:
    """Refuse what telepathy cannot make preemption-safe, before anything runs; turn off Lightning's SLURM
    auto-requeue when Lightning chose it by itself (telepathy saves, exits 99 and the submit script requeues)."""
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise UsageError(f"fit_preemptible supports one device or strategy='ddp', not {type(strategy).__name__}: "
                         "sharded strategies (FSDP, DeepSpeed) need a collective dump of their state; use a "
                         "telepathy Checkpointer(format='sharded') in your own loop for those")  # fmt: skip
    if isinstance(strategy.launcher, _MultiProcessingLauncher):
        raise UsageError("fit_preemptible needs strategy='ddp' (one process per rank, started as a script, by "
                         "torchrun or by srun), not 'ddp_spawn'/'ddp_fork'/'ddp_notebook': a signal reaches the "
                         "launching process, which does not train")  # fmt: skip
    connector = trainer._accelerator_connector  # what Lightning's signal handling reads, for any strategy
    environment = getattr(connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        if getattr(connector, "_cluster_environment_flag", None) is environment:
            raise UsageError("the Trainer was given SLURMEnvironment(auto_requeue=True): Lightning would save inside "
                             "its signal handler and requeue the job itself. telepathy saves at the step boundary, "
                             "exits 99 and telepathy/submit_preemptible.slurm requeues; pass "
                             "SLURMEnvironment(auto_requeue=False) or leave it out")  # fmt: skip
        environment.auto_requeue = False  # Lightning's default under srun; telepathy requeues instead


def _add_callback(trainer: pl.Trainer, save_dir: Any, options: dict[str, Any]) -> PreemptionCallback:
    found = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCallback)]
    if len(found) > 1:
        raise UsageError("the Trainer has several PreemptionCallbacks; give it one")
    if found:
        if options or (save_dir is not None and Path(save_dir) != found[0].save_dir):
            raise UsageError("the Trainer already has a PreemptionCallback: give save_dir and options to it, not "
                             "to fit_preemptible")  # fmt: skip
        return found[0]
    if save_dir is None:
        raise UsageError("fit_preemptible needs save_dir=... (or a PreemptionCallback in the Trainer's callbacks)")
    callback = PreemptionCallback(save_dir, **options)
    trainer.callbacks.append(callback)
    return callback


def fit_preemptible(trainer: pl.Trainer, model: pl.LightningModule, train_dataloaders: Any = None,
                    val_dataloaders: Any = None, datamodule: pl.LightningDataModule | None = None, *,
                    save_dir: str | os.PathLike | None = None, **options: Any) -> int:  # fmt: skip
    """``trainer.fit(model, ...)``, preemption-safe: resume from ``save_dir`` when it holds a checkpoint, save at
    step boundaries, and return the exit code: 0 complete, 99 after SIGTERM (130 SIGINT, 129 SIGHUP) with a
    checkpoint committed for the stop, 98 when that save failed, 2/3/75 for refusals a rerun would repeat (bad
    configuration, a checkpoint that does not fit, a save dir another run holds). ``options`` go to
    :class:`PreemptionCallback` (``interval=600``, ``every_steps``, ``keep_last``, ``seed``, ...)."""
    if not training_signals.installed():
        training_signals.install_signal_handlers()  # first: a signal during Lightning's set-up is not lost
    try:
        return _fit(trainer, model, train_dataloaders, val_dataloaders, datamodule, save_dir, options)
    except TelepathyError as exc:  # a refusal a rerun would repeat (2, 3, 75), or a failed final save (1)
        log.error("%s", describe(exc))
        return exc.exit_code


def _fit(trainer: pl.Trainer, model: pl.LightningModule, train_dataloaders: Any, val_dataloaders: Any,
         datamodule: pl.LightningDataModule | None, save_dir: Any, options: dict[str, Any]) -> int:  # fmt: skip
    callback = _add_callback(trainer, save_dir, options)
    check_trainer(trainer)
    inner = trainer.strategy.checkpoint_io
    trainer.strategy.checkpoint_io = ResumeIO(callback, inner)
    callback.armed = True
    ckpt_path = str(callback.save_dir) if callback.resume_wanted() else None
    try:
        with warnings.catch_warnings():  # Lightning's, about its own loaders; telepathy resumes the data position
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path=ckpt_path)
        code = EXIT_COMPLETE
    except TrainingStopped as stop:
        code = int(stop.code)
    finally:
        callback.armed = False
        trainer.strategy.checkpoint_io = inner
        callback.close(trainer)
    return _launcher_exit(trainer, code)


def _launcher_exit(trainer: pl.Trainer, code: int) -> int:
    """Under Lightning's own launcher (``strategy='ddp'`` started as ``python train.py``) rank 0's process is the
    one a scheduler sees, and a watcher thread in it kills every rank as soon as a rank it started exits non-zero.
    So those ranks report the stop and exit 0, and rank 0 waits for them before it returns the code."""
    launcher, environment = trainer.strategy.launcher, getattr(trainer.strategy, "cluster_environment", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or type(environment) is not LightningEnvironment:
        return code
    if trainer.local_rank > 0:
        if code != EXIT_COMPLETE:
            training_signals.say(f"rank {trainer.global_rank}: stopped with exit code {code}; exiting 0 (rank 0 "
                                 "carries the exit code under Lightning's launcher)")  # fmt: skip
        return EXIT_COMPLETE
    for proc in launcher.procs:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # the launcher's watcher kills it; the stop's code stands
            log.warning("rank process %d did not exit within 120 s of the stop", proc.pid)
    return code
