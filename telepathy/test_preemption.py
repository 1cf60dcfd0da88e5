"""Local test tool: train a small real model, checkpoint on a timer, react to signals, resume when rerun.

    python -m telepathy.test_preemption --duration 60 --interval 10
    kill -TERM <pid>   # save, exit 99      kill -USR1 <pid>   # save, continue      kill -INT <pid>  # save, exit 130

Run it again with the same --save_dir and it resumes exactly where it stopped. Every step draws from
Python's ``random``, NumPy and torch (dropout, per-sample noise), so a resume that misses any RNG shows up as
a different loss. ``--epochs`` makes the run's end a fixed step (used by the exactness tests); ``--duration``
caps the wall time of one invocation (exit 0 with a checkpoint; rerun to continue).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

if __package__ in (None, ""):  # run as a file path: make the package importable without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from telepathy import training_signals  # noqa: E402
from telepathy.checkpointer import Checkpointer  # noqa: E402
from telepathy.data import ResumableBatchSampler, resumable_loader, sample_generator  # noqa: E402
from telepathy.errors import UsageError, run_program  # noqa: E402
from telepathy.options import (  # noqa: E402
    CheckpointOptions,
    add_checkpoint_flags,
    create_save_dir,
    non_negative_float,
    non_negative_int,
    path_text,
    positive_float,
    positive_int,
    save_dir_problem,
)
from telepathy.train_state import TrainState, within_epoch  # noqa: E402

log = logging.getLogger("telepathy")


class SyntheticClassification(Dataset):
    """Deterministic from ``seed``: Gaussian inputs, labels from a fixed random linear map, and per-sample
    noise drawn from ``(seed, epoch, index)`` so it is the same whichever DataLoader worker loads it."""

    def __init__(self, samples: int, dim: int, classes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(samples, dim, generator=gen)
        self.y = (self.x @ torch.randn(dim, classes, generator=gen)).argmax(dim=1)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.05 * torch.randn(self.x.shape[1], generator=sample_generator(self.seed, self.epoch, index))
        return self.x[index] + noise, self.y[index]


def build_model(dim: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Dropout(0.2), nn.Linear(64, classes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--duration", type=positive_float, default=60.0, help="seconds this invocation trains (default 60)")
    p.add_argument("--save_dir", type=path_text, default="runs/test_preemption")
    p.add_argument("--epochs", type=positive_int, default=None, help="total epochs (default: until --duration ends)")
    p.add_argument("--samples", type=positive_int, default=512)
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--num_workers", type=non_negative_int, default=0)
    p.add_argument(
        "--step_delay",
        type=non_negative_float,
        default=0.0,
        help="seconds to pause after each step, before the save check (slows the demo; lets tests aim signals)",
    )
    p.add_argument("--log_every", type=positive_int, default=250, help="print progress every N steps")
    add_checkpoint_flags(p, interval_flags=("--interval", "--checkpoint_interval"), interval_default=10.0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--fail_at_step", type=int, default=None, help="raise an error at this step (tests)")
    p.add_argument("--no_resume", action="store_true", help="ignore existing checkpoints (needs empty dir)")
    args = p.parse_args(argv)
    problem = save_dir_problem(Path(args.save_dir))
    if problem:
        p.error(problem)
    return args


def train(args: argparse.Namespace) -> int:
    """Run (or resume) training; returns the process exit code."""
    problem = create_save_dir(args.save_dir)  # what parse_args cannot see (/proc as root): before anything starts
    if problem:
        raise UsageError(problem)
    training_signals.install_signal_handlers()  # first: a signal during start-up is acted on, not fatal
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dim, classes = 16, 4
    dataset = SyntheticClassification(args.samples, dim, classes, args.seed)
    model = build_model(dim, classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.9)
    batches = ResumableBatchSampler(args.samples, args.batch_size, seed=args.seed).batches_per_epoch
    signature = {
        "world_size": 1,
        "batch_size": args.batch_size,
        "grad_accum_steps": 1,
        "seed": args.seed,
        "samples": args.samples,
    }

    ckpt = Checkpointer(
        args.save_dir,
        parts={"model": model},
        optimizer=optimizer,
        scheduler=scheduler,
        signature=signature,
        args=vars(args),
        options=CheckpointOptions.from_args(args),
    )
    if args.no_resume and ckpt.store.committed():
        print(
            f"error: --no_resume but {args.save_dir} already holds checkpoints; use a new --save_dir", file=sys.stderr
        )
        return 2
    state = (
        TrainState()
        if args.no_resume
        else ckpt.resume(args.resume_from, strict=args.strict_resume, check=within_epoch(batches))
    )
    print(
        f"PID {os.getpid()} training in {args.save_dir} from epoch {state.epoch} batch {state.batch_idx} "
        f"(global step {state.global_step})",
        flush=True,
    )
    deadline = time.monotonic() + args.duration
    total_epochs = args.epochs if args.epochs is not None else sys.maxsize

    with ckpt.emergency_guard(state):
        while state.epoch < total_epochs:
            dataset.epoch = state.epoch
            loader = resumable_loader(
                dataset,
                args.batch_size,
                seed=args.seed,
                epoch=state.epoch,
                start_batch=state.batch_idx,
                num_workers=args.num_workers,
            )
            for x, y in loader:
                if args.fail_at_step is not None and state.global_step == args.fail_at_step:
                    raise RuntimeError(f"injected failure at step {state.global_step} (--fail_at_step)")
                loss = _train_step(model, optimizer, x, y)
                scheduler.step()
                state.advance(batches)
                state.best_loss = min(state.best_loss, loss)
                if state.global_step % args.log_every == 0:
                    print(
                        f"step {state.global_step} epoch {state.epoch} batch {state.batch_idx} "
                        f"loss {loss.hex()} ({loss:.4f})",
                        flush=True,
                    )
                if args.step_delay:
                    time.sleep(args.step_delay)
                if ckpt.step_boundary(state, metric=loss):
                    code = training_signals.exit_code()
                    name = training_signals.signal_name(training_signals.exit_signal())
                    print(f"{name}: checkpoint committed at step {state.global_step}; exiting {code}", flush=True)
                    return code
                if time.monotonic() >= deadline:
                    ckpt.save(state, "duration")
                    print(f"duration reached at step {state.global_step}; rerun to continue", flush=True)
                    return training_signals.EXIT_COMPLETE
    ckpt.save(state, "final")
    print(f"training complete at step {state.global_step} (epoch {state.epoch})", flush=True)
    return training_signals.EXIT_COMPLETE


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    # Python and NumPy randomness on purpose: label smoothing and a feature mask drawn per step.
    smoothing = 0.05 * random.random()
    mask = torch.from_numpy((np.random.rand(x.shape[1]) > 0.1).astype(np.float32))
    loss = nn.functional.cross_entropy(model(x * mask), y, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[telepathy] %(message)s", stream=sys.stdout)
    code = run_program(lambda: train(parse_args(argv)), log)
    sys.exit(code)


if __name__ == "__main__":
    main()
