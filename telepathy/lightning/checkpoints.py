"""Lightning's checkpoint dict inside telepathy's checkpoints (no Lightning import here).

Each checkpoint directory holds ``lightning.pt``, the dict ``Trainer.save_checkpoint`` would write (weights,
optimizers, LR schedulers, loop progress, callback and datamodule state), next to telepathy's ``state.pt``
(position, every RNG, the run's signature) and, with several ranks, ``rank_<r>.pt`` (each rank's RNG). The
whole directory is committed atomically and verified by its manifest, like any telepathy checkpoint, and
``lightning.pt`` stays a plain Lightning checkpoint: ``torch.load``, ``LightningModule.load_from_checkpoint`` and
``Trainer.fit(ckpt_path=...)`` read it (in the default ``full`` format; ``differential``/``compressed`` move its
tensors to shared blobs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from telepathy import tree
from telepathy.checkpointer import Checkpointer
from telepathy.disk.contents import part_file
from telepathy.errors import CheckpointInvalid, ResumeMismatchError
from telepathy.options import wrapper_resume_flags
from telepathy.train_state import TrainState

log = logging.getLogger("telepathy")

LIGHTNING = "lightning"  # the part name: lightning.pt
_PLAIN = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def plain_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``checkpoint`` with every value that ``torch.load(weights_only=True)`` could not read back (an object in
    the hyperparameters, a class) replaced by its ``str``; returns the copy and the paths that were replaced.
    Telepathy never unpickles code, so such a value could not be resumed from otherwise."""
    replaced: list[str] = []

    def leaf(value: Any, path: str) -> Any:
        if value is None or isinstance(value, torch.Tensor) or type(value) in _PLAIN:
            return value
        if isinstance(value, (Mapping, list, tuple, set, frozenset)):
            return tree.KEEP
        for base in (bool, int, float, str):  # IntEnum and friends: their plain value
            if isinstance(value, base):
                return base(value)
        replaced.append(path)
        return str(value)

    return tree.transform(dict(checkpoint), leaf), replaced


class LightningCheckpointer(Checkpointer):
    """A :class:`Checkpointer` whose checkpoints also hold Lightning's checkpoint dict, made by ``dump()`` (rank 0
    calls it when it writes the replicated files). ``check(dict, directory)`` refuses a loaded dict that does not fit
    this run, before anything is applied: ResumeMismatchError for other settings, anything else makes the checkpoint
    unusable (the next older one is tried)."""

    def __init__(self, save_dir: str | Path, dump: Callable[[], Mapping[str, Any]],
                 check: Callable[[dict[str, Any], Path], None] | None = None, **options: Any) -> None:  # fmt: skip
        self._dump, self._check = dump, check
        self._warned_about: set[str] = set()
        super().__init__(save_dir, parts={}, **options)

    def _files(self, state: TrainState, live: bool = False, user_code_done: Callable[[], None] | None = None
               ) -> dict[str, Any]:  # fmt: skip
        checkpoint, replaced = plain_checkpoint(self._dump())
        new = sorted(set(replaced) - self._warned_about)
        if new:
            self._warned_about.update(new)
            log.warning("these entries of Lightning's checkpoint dict are not plain data and are stored as their str "
                        "(a checkpoint is loaded without running code): %s", ", ".join(new[:10]))  # fmt: skip
        # (Lightning's dump, the user's callbacks included, ran above: the snapshot's copy may begin in there)
        return {LIGHTNING: checkpoint, **super()._files(state, live, user_code_done)}  # state.pt: the last file

    def resume_lightning(self) -> tuple[TrainState, dict[str, Any] | None, Path | None]:
        """Like :meth:`Checkpointer.resume` (whose steps this follows), also loading ``lightning.pt``: the newest
        checkpoint that verifies and loads (an unusable one is skipped for the next older one), or a fresh state and
        None. Returns the TrainState (RNGs restored), Lightning's dict and the directory it came from."""
        return self.resume_with(*wrapper_resume_flags(), read_more=self._load_lightning)

    def _load_lightning(self, directory: Path) -> dict[str, Any]:
        checkpoint = self.store.load_part(directory, LIGHTNING)  # weights_only: never runs code from the file
        if not isinstance(checkpoint, dict) or not {"state_dict", "loops"} <= checkpoint.keys():
            raise CheckpointInvalid(directory, part_file(LIGHTNING), "does not hold a Lightning checkpoint dict")
        try:
            if self._check is not None:
                self._check(checkpoint, directory)
        except (ResumeMismatchError, CheckpointInvalid):
            raise
        except Exception as exc:  # it verified byte for byte but cannot be used: treat it as corrupt
            raise CheckpointInvalid(directory, part_file(LIGHTNING), f"cannot be used: {exc!r}"[:500]) from exc
        return checkpoint
