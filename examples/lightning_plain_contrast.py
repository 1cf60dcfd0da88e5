"""Plain PyTorch Lightning under a preemption, for contrast with telepathy.lightning (README, "PyTorch Lightning").

    python examples/lightning_plain_contrast.py [WORK_DIR]

Trains the model of the Lightning tests (tests/helpers/lightning_models.py: MLP, dropout, Adam, per-step LR schedule,
shuffled data with a random augmentation; 3 epochs x 12 steps) three times with Lightning's own checkpointing,
configured as its docs recommend (``ModelCheckpoint(save_last=True, every_n_train_steps=1)``, ``ckpt_path="last"``):
uninterrupted; SIGTERM after step 5 (what SLURM sends at a preemption); and the rerun that resumes from
``last.ckpt``. Prints what the signalled run exited with and how the resumed run compares to the uninterrupted one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "helpers"


def train(work: Path, sigterm_at: int | None) -> int:
    """One plain Lightning run in ``work`` (resuming from last.ckpt when there is one)."""
    sys.path.insert(0, str(HELPERS))
    import lightning.pytorch as L  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from lightning_models import Net, NoisyPoints  # noqa: PLC0415

    class Report(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            print(f"step {trainer.global_step} loss {float(outputs['loss']).hex()}", flush=True)
            if trainer.global_step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(NoisyPoints(), batch_size=8, shuffle=True)
    last = L.callbacks.ModelCheckpoint(dirpath=work / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Report(), last])  # fmt: skip
    model = Net()
    trainer.fit(model, loader, ckpt_path="last" if (work / "ckpt" / "last.ckpt").exists() else None)
    torch.save(model.state_dict(), work / "final.pt")
    return 0


def run(work: Path, sigterm_at: int | None = None) -> tuple[int, dict[int, str]]:
    args = [sys.executable, __file__, "--train", str(work)] + ([str(sigterm_at)] if sigterm_at else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    return done.returncode, {int(s): h for s, h in re.findall(r"^step (\d+) loss (\S+)$", done.stdout, re.M)}


def main() -> int:
    import torch  # noqa: PLC0415

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lightning-contrast-"))
    (root / "reference").mkdir(parents=True, exist_ok=True)
    (root / "preempted").mkdir(parents=True, exist_ok=True)
    _, reference = run(root / "reference")
    code, first = run(root / "preempted", sigterm_at=5)
    print(
        f"SIGTERM after step 5: exit code {code}, {len(reference) - len(first)} of {len(reference)} steps not "
        "trained (SLURM requeues a job it kills or that exits non-zero and requeues itself; exit 0: completed)"
    )
    _, second = run(root / "preempted")
    replayed = sorted(set(first) & set(second))
    after = sorted(set(second) - set(first))
    same = [s for s in after if second[s] == reference.get(s)]
    weights = [torch.load(root / d / "final.pt", weights_only=True) for d in ("reference", "preempted")]
    equal = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    print(
        f"resumed from last.ckpt: {len(replayed)} steps replayed, steps {after[0]}..{after[-1]} trained; "
        f"{len(same)} of {len(after)} losses bit-identical to the uninterrupted run; final weights equal: {equal}"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--train":
        sys.exit(train(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None))
    sys.exit(main())
