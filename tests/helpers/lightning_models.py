"""The model and data of the Lightning tests (tests/helpers/lightning_worker.py, tests/lightning): an MLP with dropout,
Adam and a per-step LR schedule; 96 points whose every read adds noise from the global torch RNG (an augmentation)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import Dataset


class NoisyPoints(Dataset):
    """96 points in 8 dimensions, two classes; each read adds noise from the global torch RNG (an augmentation)."""

    def __init__(self, n: int = 96, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.05 * torch.randn(8), self.y[i]


class EveryOther(torch.utils.data.Sampler):
    """A custom sampler (telepathy refuses it: it cannot know how to resume its order)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(list(range(0, self.n, 2)) + list(range(1, self.n, 2)))

    def __len__(self) -> int:
        return self.n


class Net(L.LightningModule):
    def __init__(self, hidden: int = 32, tag: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2))
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Losses(L.Callback):
    """Every optimizer step's loss, as ``float.hex``."""

    def __init__(self) -> None:
        self.by_step: dict[int, str] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = float(outputs["loss"]).hex()
