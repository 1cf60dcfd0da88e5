"""The small record that, with the weights and optimizer, makes a resume exact: position, RNG, best metric,
the settings that must not change across a resume, and metadata for the humans reading it later.

``state.pt`` is this record as a plain dict of tensors and primitives, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import platform
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from telepathy import tree
from telepathy.errors import ResumeMismatchError, UsageError
from telepathy.unchanged import PlainTree

STATE_FORMAT_VERSION = 1
MAX_STATE_DEPTH = 64  # nesting a state.pt may have (RNG states: 3; a user's extra: a few); walks recurse


@dataclasses.dataclass
class TrainState:
    """Where training is. ``batch_idx`` is the number of batches of ``epoch`` already trained on, i.e. the
    index of the next batch; after the last batch of an epoch the position is ``(epoch + 1, 0)``."""

    epoch: int = 0
    global_step: int = 0
    batch_idx: int = 0
    best_loss: float = math.inf
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def advance(self, batches_per_epoch: int | None = None) -> None:
        """Record one finished optimizer step, rolling over to the next epoch after its last batch. Iteration-based
        loops (random batches, no epochs) call it without an argument: only ``global_step`` counts."""
        self.global_step += 1
        if batches_per_epoch is None:
            return
        self.batch_idx += 1
        if self.batch_idx >= batches_per_epoch:
            self.epoch += 1
            self.batch_idx = 0


def run_metadata(args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Versions, host, SLURM job identity and the run's arguments, as weights_only-safe primitives."""
    from telepathy import __version__

    slurm = {
        key: os.environ[key]
        for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
        if key in os.environ
    }
    return to_primitive(
        {
            "telepathy_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "argv": list(sys.argv),
            "args": to_primitive(dict(args or {})),
            "slurm": slurm,
        }
    )


def to_primitive(value: Any) -> Any:
    """Convert args-like values to types ``torch.load(weights_only=True)`` accepts (others become str)."""

    def leaf(item: Any, path: str) -> Any:
        if item is None or type(item) in (bool, int, float, str):
            return item
        for base in (bool, int, float, str):  # subclasses (IntEnum, TorchVersion) would need pickling
            if isinstance(item, base):
                return base(item)
        if isinstance(item, (tuple, set, frozenset)):
            return to_primitive(list(item))  # weights_only loads lists; tuples and sets become lists
        return tree.KEEP if isinstance(item, (Mapping, list)) else str(item)

    return tree.transform(value, leaf, key=str)


def checked_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """``TrainState.extra`` as saved: plain values and torch tensors round-trip exactly; anything else (a NumPy
    value, an object) is refused with its name, never turned into a string behind the user's back."""

    def leaf(value: Any, path: str) -> Any:
        if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
            return value.detach().clone() if isinstance(value, torch.Tensor) else value
        if isinstance(value, (Mapping, list, tuple)):
            return tree.KEEP
        hint = (
            " (use .item() for a NumPy scalar, torch.from_numpy for an array)"
            if type(value).__module__ == "numpy"
            else ""
        )
        raise UsageError(f"TrainState.extra{path} is a {type(value).__module__}.{type(value).__name__}, which a "
                         f"checkpoint cannot hold exactly{hint}; store Python numbers, strings, lists, dicts or torch "
                         "tensors")  # fmt: skip

    return tree.transform(dict(extra), leaf, key=str)


def run_constants(signature: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``state.pt`` that stay the same through a run: its signature and metadata."""
    return {
        "signature": to_primitive(dict(signature)),
        "metadata": {**metadata, "intra_op_threads": torch.get_num_threads()},
    }


class FixedConstants:
    """:func:`run_constants` as :class:`telepathy.tree.Fixed` values for a per-step snapshot, made again only when
    signature or metadata change (so that they are described and converted once, not at every step). A change is
    seen in their pickled bytes, which tell 1 from 1.0 and True, -0.0 from 0.0 and one key order from another
    (``==`` does not, and raises on an array); what cannot be pickled is made again at every step. (Pickling
    only: nothing is ever unpickled.) While both hold only plain values in dicts, lists and tuples, dict version
    tags and the lists' items say that nothing changed, without pickling (:class:`telepathy.unchanged.PlainTree`)."""

    def __init__(self) -> None:
        self._memo: tuple[bytes | None, dict[str, tree.Fixed]] | None = None
        self._seen: tuple[int, PlainTree | None] = (0, None)  # (thread count, signature and metadata as seen)

    def get(self, signature: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, tree.Fixed]:
        threads = torch.get_num_threads()
        seen = self._seen[1]
        if self._memo is not None and seen is not None and self._seen[0] == threads and seen.holds(signature, metadata):
            return self._memo[1]  # (plain values only, nothing changed: no need to pickle them again)
        try:
            sources = pickle.dumps((threads, signature, metadata), protocol=5)
        except Exception:  # (an unpicklable value: a lambda in the args)
            sources = None
        if sources is None or self._memo is None or self._memo[0] != sources:
            made = {name: tree.Fixed(value) for name, value in run_constants(signature, metadata).items()}
            self._memo = (sources, made)
        self._seen = (threads, PlainTree.of(signature, metadata) if sources is not None else None)
        return self._memo[1]


def state_to_dict(
    state: TrainState,
    rng_state: Mapping[str, Any],
    signature: Mapping[str, Any],
    metadata: Mapping[str, Any],
    constants: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The contents of ``state.pt``; ``constants``: :func:`run_constants` made already (a per-step snapshot
    keeps them from step to step)."""
    return {
        "format_version": STATE_FORMAT_VERSION,
        "epoch": int(state.epoch),
        "global_step": int(state.global_step),
        "batch_idx": int(state.batch_idx),
        "best_loss": float(state.best_loss),
        "timestamp": time.time(),
        "rng": dict(rng_state),
        **(run_constants(signature, metadata) if constants is None else constants),
        "extra": checked_extra(state.extra),
    }


def state_from_dict(data: Mapping[str, Any]) -> TrainState:
    """The TrainState of a ``state.pt``, whose every field is checked (a re-sealed file can hold anything)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"state.pt holds a {type(data).__name__}, not a mapping")
    version = data.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(
            f"state.pt has format_version={version!r}, this telepathy reads version {STATE_FORMAT_VERSION}; "
            "resume with the telepathy version that wrote it"
        )
    counts = {key: data.get(key) for key in ("epoch", "global_step", "batch_idx")}
    for key, value in counts.items():
        if type(value) is not int or not 0 <= value < 1 << 62:
            raise ValueError(f"state.pt: {key} {str(value)[:40]!r} is not a plausible count")
    if type(data.get("best_loss")) is not float or not isinstance(data.get("extra", {}), Mapping):
        raise ValueError("state.pt: best_loss or extra has the wrong type")
    if not isinstance(data.get("signature"), Mapping) or not isinstance(data.get("rng"), Mapping):
        raise ValueError("state.pt: the run's signature or RNG state is missing or not a mapping")
    tree.depth(data, MAX_STATE_DEPTH)  # the next save walks it recursively
    return TrainState(epoch=counts["epoch"], global_step=counts["global_step"], batch_idx=counts["batch_idx"],
                      best_loss=data["best_loss"], extra=dict(data.get("extra", {})))  # fmt: skip


def check_signature(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Refuse to resume when a setting that shapes the run (world size, batch size, seed, …) changed."""
    current = to_primitive(dict(current))
    differences = [
        f"{key}: checkpoint has {saved.get(key, '<absent>')!r}, this run has {current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key, "<absent>") != current.get(key, "<absent>")
    ]
    if differences:
        raise ResumeMismatchError(
            f"cannot resume from {where}: it was made with different run settings:\n  "
            + "\n  ".join(differences)
            + "\nResume with the same settings, or point --save_dir at a new directory to start fresh."
        )


def check_shapes(name: str, current: Mapping[str, Any], saved: Mapping[str, Any], directory: Path) -> None:
    """Refuse, before anything is loaded, a part whose tensors differ in name or shape from this run's."""
    problems = [f"missing in checkpoint: {k}" for k in current.keys() - saved.keys()]
    problems += [f"not in this model: {k}" for k in saved.keys() - current.keys()]
    for key in current.keys() & saved.keys():
        a, b = current[key], saved[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            problems.append(f"{key}: checkpoint has shape {tuple(b.shape)}, this model has {tuple(a.shape)}")
    if problems:
        raise ResumeMismatchError(
            f"cannot resume part {name!r} from {directory}/{name}.pt: it does not fit this model:\n  "
            + "\n  ".join(sorted(problems)[:20])
            + "\nResume with the same model configuration, or use a new --save_dir."
        )


def within_epoch(batches_per_epoch: int) -> Callable[[TrainState], None]:
    """A ``Checkpointer.resume(check=...)`` that refuses a saved position past the end of an epoch of this data."""

    def check(state: TrainState) -> None:
        if state.batch_idx >= batches_per_epoch:
            raise ValueError(f"batch {state.batch_idx} is past the end of an epoch of {batches_per_epoch} batches")

    return check
