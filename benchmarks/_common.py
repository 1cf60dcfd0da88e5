"""What several benchmarks share: ``--dir`` (a writable directory that exists, or one line on stderr and exit 2; it
is not created: a typo would otherwise measure whatever disk holds the new directory), and a training step of real
compute whose batch is sized for a target step time."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def usable_dir(path: Path | None, prog: str) -> Path | None:
    if path is None:
        return None
    problem = None
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist; create it first (on the disk to measure)"
    elif not os.access(path, os.W_OK | os.X_OK):
        problem = "is not writable by this user"
    if problem:
        print(f"{prog}: --dir {path} {problem}", file=sys.stderr)
        sys.exit(2)
    return path


def adamw_step(model: Any, optimizer: Any, batch: int, width: int) -> Callable[[], None]:
    """One forward, backward and optimizer step of ``model`` on a fixed random batch of ``batch`` x ``width``."""
    import torch

    x = torch.randn(batch, width)

    def step() -> None:
        loss = model(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def batch_for_step_ms(make_step: Callable[[int], Callable[[], None]], target_ms: float, tries: int) -> int:
    """The batch (steps of x1.4) whose step is nearest to ``target_ms``, each timed by its fastest of ``tries``
    steps (the least disturbed by other processes: calibration only)."""
    took: dict[int, float] = {}
    for candidate in sorted({round(2 ** (i / 2)) for i in range(25)}):
        step, times = make_step(candidate), []
        for _ in range(tries):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        took[candidate] = min(times) * 1e3
        if took[candidate] >= target_ms:
            break
    return min(took, key=lambda b: abs(math.log(took[b] / target_ms)))
