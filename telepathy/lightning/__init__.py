"""PyTorch Lightning with telepathy's guarantees: flag-only signal handlers, saves at step boundaries into atomic,
verified checkpoints, exit 99 for a requeue, and a resume that continues bit-identically (data position and every
RNG included), also with ``strategy="ddp"``.

    trainer = L.Trainer(max_epochs=10)                        # as before
    sys.exit(fit_preemptible(trainer, model, datamodule=dm, save_dir="runs/exp"))   # instead of trainer.fit

Run the same script again (the submit script's requeue does) and it resumes where the last checkpoint stopped;
run it after it finished and it returns 0 at once. Save options (``interval``, ``every_steps``, ``keep_last``,
``format``, ...) are keywords of ``fit_preemptible`` or of a :class:`PreemptionCallback` in the Trainer's callbacks.
Each checkpoint's ``lightning.pt`` is Lightning's own checkpoint dict (``load_from_checkpoint`` reads it).

Modules: :mod:`.fit` (the entry point, configuration checks), :mod:`.callback` (step boundaries, resume),
:mod:`.checkpoints` (Lightning's dict in telepathy's store), :mod:`.data` (the resumable data order).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # loaded on first use: telepathy.lightning.data needs no Lightning import
    "fit_preemptible": "telepathy.lightning.fit",
    "PreemptionCallback": "telepathy.lightning.callback",
    "TrainingStopped": "telepathy.lightning.callback",
    "ResumableSampler": "telepathy.lightning.data",
    "LIGHTNING": "telepathy.lightning.checkpoints",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'telepathy.lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
