"""telepathy: preemption-safe PyTorch training.

Signals set flags, the loop saves at step boundaries into atomic, verified checkpoints, and a resumed run
continues bit-identically. What a user needs is importable from here (loaded on first use, so that
``python -m telepathy status`` stays torch-free and fast)::

    from telepathy import Checkpointer, CheckpointOptions, PreemptibleRun, TrainState, training_signals
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpointer": "telepathy.checkpointer",
    "SaveReport": "telepathy.checkpointer",
    "PreemptibleRun": "telepathy.loop",
    "TrainState": "telepathy.train_state",
    "CheckpointOptions": "telepathy.options",
    "RetentionPolicy": "telepathy.disk.retention",
    "SaveDir": "telepathy.disk.save_dir",
    "training_signals": "telepathy.training_signals",
    "init_from_environment": "telepathy.distributed",
    "resumable_loader": "telepathy.data",
    "train_preemptible": "telepathy.hf_trainer",
    "PreemptionCallback": "telepathy.hf_trainer",
    "TelepathyError": "telepathy.errors",
    "UsageError": "telepathy.errors",
    "CannotResume": "telepathy.errors",
    "ResumeMismatchError": "telepathy.errors",
    "CheckpointInvalid": "telepathy.errors",
    "UnsafeCheckpointError": "telepathy.errors",
    "SaveDirBusy": "telepathy.errors",
    "CheckpointWriteError": "telepathy.errors",
}
__all__ = [
    "CannotResume",
    "CheckpointInvalid",
    "CheckpointOptions",
    "CheckpointWriteError",
    "Checkpointer",
    "PreemptibleRun",
    "PreemptionCallback",
    "ResumeMismatchError",
    "RetentionPolicy",
    "SaveDir",
    "SaveDirBusy",
    "SaveReport",
    "TelepathyError",
    "TrainState",
    "UnsafeCheckpointError",
    "UsageError",
    "init_from_environment",
    "resumable_loader",
    "train_preemptible",
    "training_signals",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'telepathy' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    value = loaded if module.endswith("." + name) else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from telepathy import training_signals
    from telepathy.checkpointer import Checkpointer, SaveReport
    from telepathy.data import resumable_loader
    from telepathy.disk.retention import RetentionPolicy
    from telepathy.disk.save_dir import SaveDir
    from telepathy.distributed import init_from_environment
    from telepathy.errors import (
        CannotResume,
        CheckpointInvalid,
        CheckpointWriteError,
        ResumeMismatchError,
        SaveDirBusy,
        TelepathyError,
        UnsafeCheckpointError,
        UsageError,
    )
    from telepathy.hf_trainer import PreemptionCallback, train_preemptible
    from telepathy.loop import PreemptibleRun
    from telepathy.options import CheckpointOptions
    from telepathy.train_state import TrainState
