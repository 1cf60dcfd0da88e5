"""A small Lightning run under ``telepathy.lightning.fit_preemptible``, for tests/lightning: an MLP with dropout, Adam
and a per-step LR schedule, on shuffled data with a random augmentation drawn from the global torch RNG.

    python tests/helpers/lightning_worker.py SAVE_DIR [--epochs 3] [--delay S | --delay_file F] [--devices 2]
        [--val] [--every_steps N] [--signal_at STEP:SIGNAL ...] [--snapshot_every_step]

Prints ``step N rank R loss HEX`` after every optimizer step (``float.hex``: compared to the last bit) and
``exit CODE`` at the end. ``--signal_at 12:TERM`` makes the process signal itself right after step 12's loss is
printed, a real signal at a known step (the test's own signals arrive wherever the run happens to be).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from telepathy import training_signals

training_signals.install_signal_handlers()  # before the heavy imports: a signal during start-up is not lost

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning_models import Net, NoisyPoints  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from telepathy.lightning import fit_preemptible  # noqa: E402


def say(line: str) -> None:
    """One write per line: two ranks print into the same pipe, and a line must not be split by the other's."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


class Report(L.Callback):
    def __init__(self, delay: float | str, signal_at: dict[int, int]) -> None:
        self.delay, self.signal_at = delay, signal_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        say(f"step {step} rank {trainer.global_rank} loss {float(outputs['loss']).hex()}")
        time.sleep(float(Path(self.delay).read_text()) if isinstance(self.delay, str) else self.delay)
        if step in self.signal_at and trainer.global_rank == 0:
            os.kill(os.getpid(), self.signal_at[step])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("save_dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--delay_file", help="read the step delay from this file at every step (tests change it)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--val", action="store_true")
    parser.add_argument("--every_steps", type=int, default=None)
    parser.add_argument("--signal_at", action="append", default=[])
    parser.add_argument("--snapshot_every_step", action="store_true")
    args = parser.parse_args()
    signal_at = {int(s): getattr(signal, f"SIG{name}") for s, name in (a.split(":") for a in args.signal_at)}
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = NoisyPoints()
    train = DataLoader(data, batch_size=8, shuffle=True)
    val = DataLoader(NoisyPoints(32, seed=2), batch_size=16) if args.val else None
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2 if args.val else 0,
                        callbacks=[Report(args.delay_file or args.delay, signal_at)])  # fmt: skip
    code = fit_preemptible(trainer, Net(), train, val, save_dir=args.save_dir, interval=None,
                           every_steps=args.every_steps, snapshot_every_step=args.snapshot_every_step)  # fmt: skip
    say(f"exit {code} rank {trainer.global_rank}")
    return code


if __name__ == "__main__":
    sys.exit(main())
