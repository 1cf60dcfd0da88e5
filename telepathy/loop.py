"""The shortest way to make a plain PyTorch loop preemption-safe:

    with PreemptibleRun("runs/exp", dataset, batch_size=8, epochs=2, parts={"model": model}, optimizer=opt) as run:
        for x, y in run.batches():          # resumes at the batch where the last run stopped
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step_done(loss.item())      # saves when a signal asks or the interval passed; exits 99 on SIGTERM

It is the :class:`~telepathy.checkpointer.Checkpointer` loop with the bookkeeping done for you: signal handlers
installed first, resume, the resumable data order, the emergency guard, and a ``final`` checkpoint at the end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from telepathy import training_signals
from telepathy.checkpointer import Checkpointer, Stateful
from telepathy.data import ResumableBatchSampler, resumable_loader
from telepathy.save_policy import check_interval
from telepathy.train_state import TrainState, within_epoch


class PreemptibleRun:
    """A training run over ``dataset`` for ``epochs`` epochs that survives preemption (see the module doc).
    ``interval``: seconds between periodic saves (None: signals only); ``checkpointer_options`` go to
    :class:`Checkpointer` (scheduler, options=CheckpointOptions(...) or its fields such as every_steps=1, ...)."""

    def __init__(self, save_dir: str | os.PathLike, dataset: Dataset, *, batch_size: int, epochs: int,
                 parts: Mapping[str, Stateful], optimizer: torch.optim.Optimizer | None = None, seed: int = 0,
                 interval: float | None = 300.0, num_workers: int = 0,
                 **checkpointer_options: Any) -> None:  # fmt: skip
        self.save_dir, self.dataset, self.parts, self.optimizer = save_dir, dataset, parts, optimizer
        self.batch_size, self.epochs, self.seed, self.interval = batch_size, epochs, seed, interval
        self.num_workers = num_workers
        self.options = dict(checkpointer_options)
        self.options.setdefault("interval", check_interval(interval))  # a bad value fails here, not at a step
        self.batches_per_epoch = ResumableBatchSampler(len(dataset), batch_size, seed=seed).batches_per_epoch  # type: ignore[arg-type]
        self.state = TrainState()
        self.ckpt: Checkpointer | None = None
        self._trained = False

    def __enter__(self) -> PreemptibleRun:
        if not training_signals.installed():
            training_signals.install_signal_handlers()
        signature = {"batch_size": self.batch_size, "seed": self.seed, "samples": len(self.dataset)}  # type: ignore[arg-type]
        signature.update(self.options.pop("signature", {}))
        self.ckpt = Checkpointer(self.save_dir, parts=self.parts, optimizer=self.optimizer, signature=signature,
                                 **self.options)  # fmt: skip
        self.state = self.ckpt.resume(check=within_epoch(self.batches_per_epoch))
        self._guard = self.ckpt.emergency_guard(self.state)
        self._guard.__enter__()
        return self

    def batches(self) -> Iterator[Any]:
        """Every remaining batch of every remaining epoch; call :meth:`step_done` after each one's step."""
        while self.state.epoch < self.epochs:
            loader = resumable_loader(self.dataset, self.batch_size, seed=self.seed, epoch=self.state.epoch,
                                      start_batch=self.state.batch_idx, num_workers=self.num_workers)  # fmt: skip
            for batch in loader:
                step = self.state.global_step
                yield batch
                if self.state.global_step == step:
                    raise RuntimeError("call run.step_done() after each optimizer step (the position and the "
                                       "saves follow it)")  # fmt: skip

    def step_done(self, metric: float | None = None) -> None:
        """Record one optimizer step; save when due; on SIGTERM/SIGINT save and exit (99/130)."""
        assert self.ckpt is not None, "use PreemptibleRun as a context manager"
        self._trained = True
        self.state.advance(self.batches_per_epoch)
        if metric is not None:
            self.state.best_loss = min(self.state.best_loss, float(metric))
        if self.ckpt.step_boundary(self.state, metric=metric):
            self.ckpt.close()
            sys.exit(training_signals.exit_code())

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> bool:
        assert self.ckpt is not None
        try:
            self._guard.__exit__(kind, error, tb)  # an exception: emergency checkpoint (it re-raises)
        finally:
            if kind is None and self._trained and self.state.epoch >= self.epochs:
                self.ckpt.save(
                    self.state, "final", None if self.state.best_loss == float("inf") else self.state.best_loss
                )
            self.ckpt.close()
        return False
