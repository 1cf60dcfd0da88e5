"""Full-size check for the main job: the README's default run uninterrupted, and the same run interrupted by
SIGTERM, SIGUSR1 and SIGKILL (each followed by ``--auto_resume``), must end with identical trained parts and
identical per-step losses. Prints one line per run and a verdict. About 6 minutes on 2 cores.

    python scripts/default_run_equality.py [--steps_between 250]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402
from harness import Interrupt, RunResult, deep_equal, run_once  # noqa: E402

from telepathy.store.checkpoint_store import CheckpointStore  # noqa: E402

MAIN = [sys.executable, "-m", "telepathy.preemptible_training"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps_between", type=int, default=250)
    gap = parser.parse_args().steps_between
    root = Path(tempfile.mkdtemp(prefix="telepathy-equality-"))
    args = ["--auto_resume", "--log_every", "1", "--checkpoint_interval", "1000000"]
    runs = {
        "uninterrupted": [[]],
        "interrupted": [
            [Interrupt(gap, signal.SIGTERM)],
            [Interrupt(2 * gap, signal.SIGUSR1), Interrupt(3 * gap, signal.SIGKILL)],
        ],
    }
    results = {}
    for name, schedule in runs.items():
        result, started = RunResult(), time.monotonic()
        for invocation in range(len(schedule) + 1):
            interrupts = schedule[invocation] if invocation < len(schedule) else []
            code = run_once(["--save_dir", str(root / name), *args], interrupts, result, trainer=MAIN, timeout=900)
            if code == 0:
                break
        results[name] = result
        last = float.fromhex(result.losses[max(result.losses)])
        print(f"{name:14s} exits {result.exit_codes} wall {time.monotonic() - started:.0f} s "
              f"steps {len(result.losses)} final loss {last:.4f}")  # fmt: skip
    final = {n: CheckpointStore(root / n).newest_valid()[0].path for n in runs}
    diffs = []
    for part in ("encoder", "adapter_llama", "optimizer"):
        a, b = (torch.load(final[n] / f"{part}.pt", weights_only=True) for n in runs)
        diffs += [f"{part}{d}" for d in deep_equal(a, b)]
    a, b = results["uninterrupted"], results["interrupted"]
    loss_diffs = [s for s in a.losses if a.losses[s] != b.losses.get(s)] + b.replay_mismatches
    same = not diffs and not loss_diffs
    print(f"weights/optimizer differences: {len(diffs)}; per-step loss differences (incl. replayed steps): "
          f"{len(loss_diffs)}; verdict: {'IDENTICAL' if same else 'DIFFERENT'}  ({root})")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
