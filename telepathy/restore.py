"""Reading a checkpoint back into a run: load and check everything first, apply only a checkpoint that passed.

A checkpoint can verify byte for byte and still be unusable (a file a hostile hand re-sealed, a position past the
end of the data, a damaged blob). :func:`read_checkpoint` turns every such problem into :class:`CheckpointInvalid`
before anything of the run is touched, so :meth:`Checkpointer.resume` can fall back to the next older checkpoint
exactly as for a corrupt one; settings that differ (a mismatch) are the user's to fix and raise instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from telepathy import rng, training_signals
from telepathy.disk.contents import OPTIMIZER, STATE, part_file, rank_part
from telepathy.disk.manifest import read_manifest
from telepathy.errors import CheckpointInvalid, ResumeMismatchError
from telepathy.store import collective
from telepathy.train_state import TrainState, check_shapes, check_signature, state_from_dict

if TYPE_CHECKING:
    from telepathy.checkpointer import Checkpointer

log = logging.getLogger("telepathy")


@dataclass
class Loaded:
    state: TrainState
    saved_state: dict[str, Any]
    parts: dict[str, Any]
    optimizer: dict[str, Any]
    saved_world: int
    own_rng: Any


def read_checkpoint(ckpt: Checkpointer, directory: Path, check: Callable[[TrainState], None] | None) -> Loaded:
    """Everything a resume needs from ``directory``, loaded and checked before anything is applied; a file
    that does not load or does not make sense raises CheckpointInvalid (settings that differ: a mismatch)."""
    manifest = read_manifest(directory)  # verified by the catalog
    current = STATE
    try:
        saved_state = ckpt.store.load_part(directory, STATE)
        state = state_from_dict(saved_state)  # a damaged state.pt is invalid, not a mismatch of settings
        check_signature(saved_state["signature"], ckpt.signature, str(directory))
        if check is not None:
            check(state)
        was_sharded = bool(manifest.get("sharded"))
        if was_sharded != ckpt.sharded:
            raise ResumeMismatchError(f"cannot resume from {directory}: it was saved with sharded={was_sharded}, "
                                      f"this run has sharded={ckpt.sharded}")  # fmt: skip
        loaded = {}
        for current in [] if ckpt.sharded else list(ckpt.parts):
            loaded[current] = ckpt.store.load_part(directory, current)
            this_model = ckpt.parts[current].state_dict()
            check_tensors(this_model, loaded[current])
            check_shapes(current, this_model, loaded[current], directory)
        current = OPTIMIZER
        opt = ckpt.store.load_part(directory, OPTIMIZER)
        if not isinstance(opt, dict):
            raise TypeError("optimizer.pt does not hold a dict")
        if ckpt.optimizer is not None and not ckpt.sharded and opt.get("optimizer") is not None:
            check_optimizer_state(ckpt.optimizer.state_dict(), opt["optimizer"])
        saved_world = int(manifest.get("world_size", 1))
        current = rank_part(ckpt.rank)
        own_rng = None
        if saved_world > 1 and part_file(current) in manifest["files"]:  # this rank's own random streams
            own_rng = ckpt.store.load_part(directory, current)["rng"]
            rng.check_rng_state(own_rng, ckpt.generators)
        elif ckpt.rank == 0:
            current = STATE
            rng.check_rng_state(saved_state["rng"], ckpt.generators)
    except (ResumeMismatchError, CheckpointInvalid):
        raise
    except Exception as exc:  # it verified byte for byte but cannot be used: treat it as corrupt
        raise CheckpointInvalid(directory, part_file(current), f"cannot be used: {exc!r}"[:500]) from exc
    return Loaded(state, saved_state, loaded, opt, saved_world, own_rng)


def check_tensors(this_model: Mapping[str, Any], saved: Any) -> None:
    """A saved part must be a mapping with a tensor wherever this model has one (a re-sealed file could hold an
    int, a string or nested lists there, which ``load_state_dict`` would fail on half-way through)."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"the part holds a {type(saved).__name__}, not a state dict")
    wrong = [k for k, v in this_model.items() if isinstance(v, torch.Tensor) and k in saved
             and not isinstance(saved[k], torch.Tensor)]  # fmt: skip
    if wrong:
        raise TypeError(f"not a tensor in the checkpoint: {', '.join(sorted(wrong)[:5])}")


def check_optimizer_state(this_optimizer: Mapping[str, Any], saved: Any) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, made before anything is applied: a ``state`` mapping of
    mappings, and as many parameter groups, each with as many parameters, as this run's optimizer."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping):
        raise TypeError("the optimizer state is not a mapping with a 'state' mapping")
    if not all(isinstance(v, Mapping) for v in saved["state"].values()):
        raise TypeError("a parameter's optimizer state is not a mapping")
    groups, mine = saved.get("param_groups"), this_optimizer["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                               for g in groups):  # fmt: skip
        raise TypeError("the optimizer's param_groups are not a list of groups with 'params'")
    if not groups:
        raise ValueError("the optimizer state has no parameter groups")
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:  # another optimizer set-up
        raise ResumeMismatchError(f"the optimizer has parameter groups of sizes {[len(g['params']) for g in groups]}, "
                         f"this run's of sizes {[len(g['params']) for g in mine]}")  # fmt: skip


def apply_checkpoint(ckpt: Checkpointer, directory: Path, read: Loaded) -> TrainState:
    """Put a checkpoint that :func:`read_checkpoint` loaded and checked into the run."""
    state, saved_state, loaded, opt = read.state, read.saved_state, read.parts, read.optimizer
    saved_world, own_rng = read.saved_world, read.own_rng
    threads = (saved_state.get("metadata") or {}).get("intra_op_threads")
    if isinstance(threads, int) and threads != torch.get_num_threads():
        log.warning("this checkpoint was written with %d intra-op threads and this run uses %d: CPU kernels may sum "
                    "in another order, so the resumed run may not be bit-identical; use torch.set_num_threads(%d)",
                    threads, torch.get_num_threads(), threads)  # fmt: skip
    if saved_world != ckpt.world_size and ckpt.rank == 0:
        log.warning("resuming a checkpoint written by %d rank(s) with %d: training continues at the same "
                    "global position (epoch %d, batch %d) in the same data order, but not bit-identically to an "
                    "uninterrupted run (per-rank random streams and reduction order change); keep the global "
                    "batch size fixed so that a batch index means the same samples", saved_world,
                    ckpt.world_size, state.epoch, state.batch_idx)  # fmt: skip
    if ckpt.sharded:
        from telepathy.store import sharded  # noqa: PLC0415 (DCP takes ~1.5 s to import; only sharded runs pay)

        sharded.load_parts(ckpt.parts, ckpt.optimizer, directory)
    # Order matters: weights, then optimizer (its state is cast to the parameters' devices), then the
    # scheduler (which reads optimizer param groups), then the scaler, and the RNGs last, after any
    # construction work that could have drawn random numbers.
    for name, saved in loaded.items():
        ckpt.parts[name].load_state_dict(saved)
    for obj, key in ((ckpt.optimizer, "optimizer"), (ckpt.scheduler, "scheduler"), (ckpt.scaler, "scaler")):
        if obj is not None and not (key == "optimizer" and ckpt.sharded):
            if opt.get(key) is None:
                raise ResumeMismatchError(f"{directory}/{part_file(OPTIMIZER)} has no {key} state but this run "
                                          f"has a {key}")  # fmt: skip
            obj.load_state_dict(opt[key])
    if own_rng is not None:
        rng.restore_rng_state(own_rng, ckpt.generators)
    elif ckpt.rank == 0:  # a rank that did not exist keeps its own seeding
        rng.restore_rng_state(saved_state["rng"], ckpt.generators)
    ckpt.policy.saved()
    training_signals.say(f"resumed from {directory}: epoch {state.epoch}, batch {state.batch_idx}, global step "
                         f"{state.global_step}")  # fmt: skip
    if ckpt.recorder is not None:
        ckpt.recorder.start(state.global_step, state.epoch, resumed_from=str(directory))
    return state


def resume(ckpt: Checkpointer, resume_from: str | os.PathLike | None, strict: bool,
           check: Callable[[TrainState], None] | None, read_more: Callable[[Path], Any] | None,
           ) -> tuple[TrainState, Any, Path | None]:  # fmt: skip
    """:meth:`Checkpointer.resume_with`: the newest checkpoint that reads and checks (or exactly the one asked
    for), applied; an unusable one is skipped for the next older one unless a particular one was asked for."""
    if ckpt.collective:  # rank 0 verifies and decides; every rank loads the same checkpoint
        chosen = collective.choose_on_rank0(lambda: ckpt.store.resume_point(resume_from, strict))
        candidates = iter([] if chosen is None else [chosen])
    elif resume_from is not None or strict:
        chosen = ckpt.store.resume_point(resume_from, strict)
        candidates = iter([] if chosen is None else [chosen])
    else:
        candidates = ckpt.store.catalog.valid_newest_first()
    for directory in candidates:
        try:
            read = read_checkpoint(ckpt, directory, check)
            more = read_more(directory) if read_more is not None else None
        except CheckpointInvalid as exc:
            if ckpt.collective or resume_from is not None or strict:
                raise
            log.warning("skipping checkpoint %s: %s: %s; trying the next older one", directory, exc.file,
                        exc.reason)  # fmt: skip
            ckpt.store.unusable.add(directory)  # this run's own save at that step replaces it
            continue
        return apply_checkpoint(ckpt, directory, read), more, directory
    if ckpt.store.committed() and not ckpt.collective:
        newest = ckpt.store.committed()[-1].path
        raise CheckpointInvalid(newest.parent, newest.name, f"none of the {len(ckpt.store.committed())} "
                                "checkpoints verifies and loads (see the warnings above); starting from scratch "
                                "would hide that: move them away or use a new --save_dir")  # fmt: skip
    log.info("no checkpoint in %s; starting from scratch", ckpt.store.save_dir)
    if ckpt.recorder is not None:
        ckpt.recorder.start(0, 0)
    return TrainState(), None, None
