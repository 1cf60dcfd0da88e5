"""Each step's training state, copied into a shared-memory slot (:mod:`telepathy.disk.slots`).

The copy is the only per-step cost to the training loop: one ``copy_`` per tensor into a preallocated mapping
(no pickling, no hashing, no disk) and a small JSON description of the rest (positions, RNG states, optimizer
hyper-parameters; :mod:`telepathy.store.snapshot_format`). A big state on the CPU (at least
``TELEPATHY_SNAPSHOT_OVERLAP_MIB``, default 16) starts its copy in a thread before it is described, and the two
overlap (:meth:`StepSnapshots.capture`). If the trainer dies, its supervisor rebuilds the same ``files`` a
normal save would write and commits them with the normal atomic protocol; the resumed run is then bit-identical
to one that was never killed, one step in flight lost at most.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import os
from collections.abc import Mapping
from typing import Any

import torch

from telepathy.disk.slots import SLOT_DIR_ENV, SlotWriter, align, is_slot_dir
from telepathy.store.known_dicts import KnownDicts
from telepathy.store.overlapped_copy import BegunCopy, OverlappedCopy, storage_holds
from telepathy.store.snapshot_format import DTYPES, Once, UnsupportedState, describe
from telepathy.tree import KeptVersions
from telepathy.unchanged import TensorLayouts

log = logging.getLogger("telepathy")
OVERLAP_ENV = "TELEPATHY_SNAPSHOT_OVERLAP_MIB"
OVERLAP_MIB = 16  # states at least this big are copied in a thread while the trainer describes them (the default)
WHILE_WAKING = 4 << 20  # bytes the trainer copies itself while the thread wakes (~0.2 ms here)


class _Layout:
    """The tensors' dtypes, shapes and places in a slot and the state's constants, with the JSON of both: remade
    only when a tensor changes dtype, shape or layout or a dict its keys (the optimizer's state appears, a model
    grows), not at every step."""

    def __init__(self, key: tuple[list[Any], list[Any], list[Any]], tensors: list[torch.Tensor]) -> None:
        self.key = key
        self.tensors = tensors  # (the objects: while they are the same ones, none can have become sparse)
        self.texts = [_text_of(c) for c in key[2]]
        self.guard = TensorLayouts(tensors)  # (sees dtypes, shapes, strides and sparse ones in one call)
        self.storages = _held_storages(tensors, None)  # (a tensor whose storage moved or resized: checked again)
        table, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            table.append([str(t.dtype), list(t.shape), offset, nbytes])
            offset = align(offset + nbytes)
        self.data_len = offset
        self.json = b'"tensors":' + _json(table) + b',"constants":' + _json(key[2])
        self.non_empty = [n > 0 for _, _, _, n in table]
        self.all_non_empty = all(self.non_empty)
        self.views = [(DTYPES[d], tuple(shape), at, n) for d, shape, at, n in table if n]
        self.on_cpu = _on_cpu(tensors)  # (a GPU's copy goes on the trainer's stream, in the trainer's thread)
        self.renewed: frozenset[int] = frozenset()  # (views whose tensor changed during the last step boundary:
        # the RNG states telepathy reads; the trainer copies those itself beside the thread, not after it)
        self.shares: tuple[frozenset[int], list[int], list[int]] | None = None  # (renewed, the thread's, the
        # trainer's first views: the split of a copy begun early, made again only when ``renewed`` changed)
        self.aliases: list[tuple[torch.Tensor, int, int, torch.Tensor] | None] = [None] * len(self.views)  # (per
        # view: the tensor a copy began from, its address and storage size then, the alias copied from)

    def copied(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors that have bytes in a slot (an empty one has no view), in the order of the views."""
        return tensors if self.all_non_empty else list(itertools.compress(tensors, self.non_empty))

    def split(self) -> tuple[list[int], list[int]]:
        """The views a copy begun early leaves to the thread, and those the trainer copies itself while the
        thread wakes (the last ones, up to :data:`WHILE_WAKING` bytes): the views not renewed at every step."""
        if self.shares is None or self.shares[0] is not self.renewed:
            candidates = [i for i in range(len(self.views)) if i not in self.renewed]
            mine, room = [], WHILE_WAKING
            for i in reversed(candidates[1:]):  # (the thread gets one view at least)
                if self.views[i][3] <= room:
                    mine.append(i)
                    room -= self.views[i][3]
            trainers = set(mine)
            threads = [i for i in candidates if i not in trainers]
            self.shares = (self.renewed, threads, mine)
            for i in self.renewed:  # (no copy begins from these now: an alias kept would keep the old tensor)
                self.aliases[i] = None
        return self.shares[1], self.shares[2]

    def aliases_of(self, sources: list[torch.Tensor], views: list[int]) -> list[torch.Tensor] | None:
        """An alias (``detach``) of each of these views' tensors, which keeps its storage object alive (so its
        address cannot be reused while the thread reads it) whatever becomes of the tensor; None if one is an
        inference tensor (no version counter: it cannot be checked later) or lacks its bytes. An alias made at an
        earlier step is the same view while the tensor is the same object, at the same address as the alias, its
        storage of the same size, with the shape and strides it had then: those of ``guard`` (the caller checked;
        aliases are forgotten when ``guard`` is remade for new strides)."""
        cache, out = self.aliases, []
        for i in views:
            tensor, kept = sources[i], cache[i]
            if (kept is None or kept[0] is not tensor or kept[1] != tensor.data_ptr() or kept[1] != kept[3].data_ptr()
                    or kept[2] != tensor.untyped_storage().nbytes()):  # fmt: skip
                if tensor.is_inference() or not storage_holds(tensor):  # (capture() names a freed storage)
                    return None
                kept = cache[i] = (tensor, tensor.data_ptr(), tensor.untyped_storage().nbytes(), tensor.detach())
            out.append(kept[3])
        return out


class StepSnapshots:
    """The trainer's per-step copy into its supervisor's slots (``directory`` from ``TELEPATHY_SNAPSHOT_DIR``).
    What does not change between steps is made once and kept while the state keeps its layout: the table of
    tensors and its JSON, and the destination views of each slot (building them at every step costs more than
    copying a small state)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.writer = SlotWriter(directory, on_unmap=self._forget_views)
        self.disabled: str | None = None
        self._layout: _Layout | None = None
        self._views: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # id(mapping) -> ((at, length, layout), views)
        self._slot_layout: tuple[Any, bytes] = (None, b"")  # ((layout, store, save_dir), the JSON of all three)
        self._fixed: dict[int, tuple[Any, Any]] = {}  # id(tree.Fixed) -> (it, its description)
        self._known = KnownDicts()  # (dicts of tensors described before and unchanged since)
        self._overlap_bytes = _overlap_bytes()
        self._copier = OverlappedCopy()
        self._started: BegunCopy | None = None  # the copy start_copy() began, until capture() used it

    def start_copy(self) -> None:
        """Big states, once no user code is left to run in building the step's state, before it is described:
        start copying the tensors of the last step's layout into the next slot, in a thread. Most are the same
        objects at every step (parameters, optimizer moments) and describing changes none; still, :meth:`capture`
        copies again each one that is not the object copied, whose storage or version changed meanwhile, or that
        no longer has exactly that layout. The thread copies from aliases (``detach``) that keep each storage
        object alive whatever becomes of the tensor (not its bytes: see :meth:`BegunCopy.changed`)."""
        layout = self._layout
        if (self._started is not None or self.disabled is not None or layout is None
                or layout.data_len < self._overlap_bytes or not layout.views or not layout.on_cpu):  # fmt: skip
            return
        if self._copier.running:  # (a start interrupted before it was recorded: that copy ends first)
            self._copier.wait()
        threads, mine = layout.split()
        if not threads:  # (every tensor changed during the last boundary: the next step tries the thread again)
            layout.renewed = frozenset()
            return
        if not layout.guard.same(layout.tensors):  # (one changed shape or strides in place since)
            return
        sources = layout.copied(layout.tensors)
        aliases = layout.aliases_of(sources, threads + mine)
        if aliases is None:  # (an inference tensor: copied after describing)
            return
        try:
            mapping, at = self.writer.begin(layout.data_len)
        except OSError:
            return  # (capture() meets the same error and says so)
        destinations = self._destinations(mapping, at, layout.data_len, layout)
        n = len(threads)

        def meanwhile() -> None:  # (the trainer's own share, while the thread wakes)
            _copy([destinations[i] for i in mine], aliases[n:])

        if self._copier.start([destinations[i] for i in threads], aliases[:n], meanwhile if mine else None):
            self._started = BegunCopy(layout, destinations, sources, threads + mine, aliases)

    def capture(self, step: int, files: Mapping[str, Any], info: Mapping[str, Any], store: Mapping[str, Any],
                save_dir: str = "") -> None:  # fmt: skip
        if self.disabled is not None:  # (start_copy() begins nothing then)
            return
        try:
            self.start_copy()  # (unless the caller began it already)
            self._capture(step, files, info, store, save_dir)
        finally:  # (no copy may outlive a capture: the writer may remap the slot, a reader may look)
            self.settle()

    def settle(self) -> None:
        """Wait for a copy begun by :meth:`start_copy` and forget it."""
        self._copier.wait()
        self._started = None

    def _capture(self, step: int, files: Mapping[str, Any], info: Mapping[str, Any], store: Mapping[str, Any],
                 save_dir: str) -> None:  # fmt: skip
        try:
            structure, tensors, constants = describe(files, check=False, fixed_cache=self._fixed, known=self._known)
            last = self._layout
            exact = last is not None and last.guard.same(tensors) and _same_constants(constants, last)
            if exact:
                last.storages = _held_storages(tensors, last.storages)
                last.tensors = tensors  # (the usual step: one C call looked at every tensor)
            else:
                describe(files, check=True)  # names the first tensor a slot cannot hold
                key = (list(map(_DTYPE, tensors)), list(map(torch.Tensor.size, tensors)), constants)
                if (last is None or last.key[:2] != key[:2] or not _same_constants(constants, last)
                        or not _still_dense(tensors, last.tensors)):  # fmt: skip
                    self._layout = _Layout(key, tensors)
                else:  # the same layout (strides, grad mode or requires_grad changed): checked this way from now
                    last.tensors = tensors
                    last.guard = TensorLayouts(tensors)
                    last.on_cpu = _on_cpu(tensors)  # (model.cuda() keeps the objects, dtypes and shapes)
                    last.aliases = [None] * len(last.views)  # (those kept have the strides of before)
                    last.storages = _held_storages(tensors, last.storages)
        except UnsupportedState as exc:  # loud, once: the run goes on with interval saves only
            self.disabled = str(exc)
            log.error("per-step snapshots are off for this run: the training state holds %s, which a snapshot "
                      "cannot describe; a hard kill now loses up to one checkpoint interval", exc)  # fmt: skip
            return
        layout = self._layout
        made_for = self._slot_layout[0]
        if made_for is None or made_for[0] is not layout or made_for[1:] != (store, save_dir):
            parts = (b"{", layout.json, b',"store":', _json(dict(store)), b',"save_dir":', _json(save_dir), b"}")
            text = b"".join(parts)
            self._slot_layout = ((layout, dict(store), save_dir), text)
        meta = _json({"files": structure, "info": dict(info)})  # (one encoder call, not two)
        started = self._started if exact else None
        if started is None:
            self._copier.wait()  # (a copy of another layout: nothing of it is used, nothing may still write)

        def fill(mapping: Any, at: int, length: int) -> None:
            destinations = self._destinations(mapping, at, length, layout)
            sources = layout.copied(tensors)
            if (started is not None and started.layout is layout and started.destinations is destinations
                    and len(sources) == len(destinations)):  # fmt: skip
                # the thread's copy is still running: the trainer copies the others meanwhile, then what changed
                changed = started.changed(sources)
                renewed = frozenset(changed)
                if renewed != layout.renewed:  # (kept as the same object otherwise: split() is made once for it)
                    layout.renewed = renewed  # (the next step's thread leaves these to the trainer)
                _copy(*started.others(destinations, sources))
                redo = started.redo(changed, completed=self._copier.wait())
                destinations, sources = [destinations[i] for i in redo], [sources[i] for i in redo]
            else:
                self._copier.wait()
            _copy(destinations, sources)

        try:  # (the writer waits for the copy before it moves the data or remaps the slot)
            moving = self.settle if started is not None else None
            self.writer.write(step, meta, layout.data_len, fill, self._slot_layout[1], before_moving=moving)
        except OSError as exc:  # a full /dev/shm, a removed or read-only slot directory: loud, once; training goes on
            self.disabled = str(exc)
            log.error(
                "per-step snapshots are off for this run: they cannot be written to %s (%s; %.1f MiB per "
                "slot, two slots); a hard kill now loses up to one checkpoint interval. Give /dev/shm more "
                "room (docker: --shm-size)",
                self.writer.dir,
                exc.strerror or exc,
                layout.data_len / 2**20,
            )

    def _destinations(self, mapping: Any, at: int, length: int, layout: _Layout) -> list[torch.Tensor]:
        cached = self._views.get(id(mapping))
        if cached is not None and cached[0] == (at, length, layout):
            return cached[1]
        whole = torch.frombuffer(mapping, dtype=torch.uint8, count=length, offset=at) if length else None
        views = [whole[off : off + n].view(dtype).view(shape) for dtype, shape, off, n in layout.views]
        self._views[id(mapping)] = ((at, length, layout), views)
        return views

    def _forget_views(self, mapping: Any) -> None:
        """Before the writer closes a mapping: no view of it may remain (the mapping refuses to close)."""
        self._views.pop(id(mapping), None)

    def close(self) -> None:
        self._copier.stop()
        self._started = None
        self.writer.close()


def _copy(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if sources:
        with torch.inference_mode():  # (no detach: 177 of them cost more than the copy of a small state)
            torch._foreach_copy_(destinations, sources)  # one call, not one per tensor


def _held_storages(tensors: list[torch.Tensor], before: tuple[list[int], list[int]] | None
                   ) -> tuple[list[int], list[int]]:  # fmt: skip
    """The tensors' addresses and their storages' sizes, once each tensor where either differs from ``before``
    (all, without it) is checked to have its bytes: a storage freed or shrunk in place changes its size (its
    address, malloc may hand back)."""
    now = list(map(torch.Tensor.data_ptr, tensors)), [t.untyped_storage().nbytes() for t in tensors]
    if now != before:
        for i, tensor in enumerate(tensors):
            if (before is None or len(before[0]) != len(now[0]) or now[0][i] != before[0][i]
                    or now[1][i] != before[1][i]) and not storage_holds(tensor):  # fmt: skip
                shape = tuple(tensor.shape)
                raise UnsupportedState(f"a tensor of shape {shape} whose storage lacks the bytes its shape reads "
                                       "(freed or shrunk in place: untyped_storage().resize_)")  # fmt: skip
    return now


def _on_cpu(tensors: list[torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


_DTYPE = operator.attrgetter("dtype")


def _same_constants(now: list[Any], layout: _Layout) -> bool:
    """The layout's constants still: the same objects where they cannot change in place (key sets, versions
    telepathy built, fixed values), else the same JSON as when the layout was made (which tells 1, 1.0 and True,
    0.0 and -0.0 apart, as the layout's JSON does)."""
    before, texts = layout.key[2], layout.texts
    if len(now) != len(before):
        return False
    for a, b, text in zip(now, before, texts, strict=True):
        if a is b and text is None:
            continue
        if type(a) is tuple or type(b) is tuple:  # key sets: ints and strings
            if not (type(a) is type(b) and a == b and list(map(type, a)) == list(map(type, b))):
                return False
        elif isinstance(a, Once) or isinstance(b, Once) or _json(a) != (text if text is not None else _json(b)):
            return False
    return True


def _text_of(constant: Any) -> bytes | None:
    """What a constant is compared with at later steps: its JSON, or None where the same object cannot have
    changed (key sets are tuples; versions telepathy built are never changed in place; a fixed value's
    description is equal only to itself)."""
    return None if isinstance(constant, (tuple, KeptVersions, Once)) else _json(constant)


def _still_dense(tensors: list[torch.Tensor], before: list[torch.Tensor]) -> bool:
    """Each tensor that is not the same object as at the last step (most are: parameters, optimizer moments)
    strided still; the same object cannot have become sparse."""
    if len(tensors) != len(before):
        return False
    new = itertools.compress(tensors, map(operator.is_not, tensors, before))
    return all(t.layout == torch.strided for t in new)


# (made once; no cycle check: what it encodes are trees that describe and this module build)
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _json(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _overlap_bytes() -> int:
    """From ``TELEPATHY_SNAPSHOT_OVERLAP_MIB`` (a number of MiB, 0: every state), else :data:`OVERLAP_MIB`."""
    text = os.environ.get(OVERLAP_ENV, "").strip()
    try:
        mib = float(text) if text else OVERLAP_MIB
    except ValueError:
        mib = math.nan
    if not 0 <= mib < 2**40:
        log.warning("%s=%r is not a number of MiB >= 0; using %d", OVERLAP_ENV, text, OVERLAP_MIB)
        mib = OVERLAP_MIB
    return int(mib * 2**20)


def from_environment(enabled: bool, several_ranks: bool) -> StepSnapshots | None:
    """The per-step snapshots a Checkpointer takes: on when asked for and a supervisor gave its slot directory."""
    directory = slot_dir_from_environment()  # taken out of the environment even when not used here
    if not enabled:
        return None
    if several_ranks:
        from telepathy.errors import UsageError  # noqa: PLC0415

        raise UsageError("snapshot_every_step is not supported with several ranks or sharded state yet; drop "
                         "--snapshot_every_step (interval and signal saves still work)")  # fmt: skip
    if not directory:
        log.warning("snapshot_every_step needs the supervising wrapper (python -m telepathy.preemptible_training "
                    "... -- your command) to hold the snapshots; without it a hard kill loses up to one "
                    "checkpoint interval")  # fmt: skip
        return None
    problem = is_slot_dir(directory)
    if problem is not None:
        log.error("per-step snapshots are off: %s=%s is not a snapshot directory of a telepathy supervisor (%s); a "
                  "hard kill now loses up to one checkpoint interval", SLOT_DIR_ENV, directory, problem)  # fmt: skip
        return None
    return StepSnapshots(directory)


_inherited: tuple[int, str] | None = None  # (pid, directory): the supervisor's slot directory, for this process only


def slot_dir_from_environment() -> str | None:
    """The slot directory the supervisor gave this process. Taken out of the environment on first use, so that
    a process the trainer starts (an evaluation job with a Checkpointer of its own) cannot write into the
    trainer's slots and have its state rescued in the trainer's place; a forked child does not use it either."""
    global _inherited
    value = os.environ.pop(SLOT_DIR_ENV, None)
    if value:
        _inherited = (os.getpid(), value)
    return _inherited[1] if _inherited is not None and _inherited[0] == os.getpid() else None
