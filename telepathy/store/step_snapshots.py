"""Each step's training state, copied into a shared-memory slot (:mod:`telepathy.disk.slots`) and rebuilt from it.

The copy is the only per-step cost to the training loop: one ``copy_`` per tensor into a preallocated mapping
(no pickling, no hashing, no disk) and a small JSON description of the rest (positions, RNG states, optimizer
hyper-parameters). If the trainer dies, its supervisor rebuilds the same ``files`` a normal save would write
and commits them with the normal atomic protocol; the resumed run is then bit-identical to one that was never
killed, one step in flight lost at most.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from telepathy import tree
from telepathy.disk.slots import SLOT_DIR_ENV, SlotWriter, align

log = logging.getLogger("telepathy")

_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
                               torch.complex128)}  # fmt: skip
_DTYPE_SET = frozenset(_DTYPES.values())
_TENSOR, _TUPLE, _DICT, _INTS = "__T__", "__t__", "__d__", "__L__"
_LONG_LIST = 32  # a list of this many ints or more (Python's RNG state: 625) is copied as one int64 tensor


class UnsupportedState(TypeError):
    """The state holds a value a slot cannot describe (only tensors, containers and plain values)."""


def describe(files: Mapping[str, Any]) -> tuple[Any, list[torch.Tensor]]:
    """The JSON-able structure of ``files`` with each tensor replaced by its index in the returned list."""
    tensors: list[torch.Tensor] = []

    def tensor(value: torch.Tensor, path: str) -> dict[str, int]:
        if value.dtype not in _DTYPE_SET or value.is_sparse or value.is_quantized:
            raise UnsupportedState(f"{path}: a {value.dtype} tensor{' (sparse)' if value.is_sparse else ''}")
        tensors.append(value)
        return {_TENSOR: len(tensors) - 1}

    def leaf(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return tensor(value, path)
        if isinstance(value, dict) and all(type(k) is str and type(v) is torch.Tensor for k, v in value.items()):
            # a module's state dict, a parameter's optimizer state: most of the state, described in one pass
            if not any(k.startswith("__") for k in value):
                return {k: tensor(v, f"{path}/{k}") for k, v in value.items()}
        if value is None or type(value) in (bool, int, float, str):
            return value
        if isinstance(value, tuple):
            return {_TUPLE: [tree.transform(v, leaf, path=f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            plain = all(type(k) is str and not k.startswith("__") for k in value)
            if plain:
                return tree.KEEP
            return {_DICT: [[tree.transform(k, leaf), tree.transform(v, leaf, path=f"{path}/{k}")]
                            for k, v in value.items()]}  # fmt: skip
        if type(value) is list:
            if len(value) >= _LONG_LIST and set(map(type, value)) == {int}:  # ints only (no bools, no floats)
                try:
                    tensors.append(torch.tensor(value, dtype=torch.int64))
                except (OverflowError, ValueError, RuntimeError):  # an int past 64 bits: kept as a list
                    return tree.KEEP
                return {_INTS: len(tensors) - 1}
            return tree.KEEP
        raise UnsupportedState(f"{path}: a value of type {type(value).__name__}")

    return tree.transform(dict(files), leaf), tensors


def rebuild(structure: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`describe`."""
    if isinstance(structure, dict):
        if _TENSOR in structure:
            return tensors[structure[_TENSOR]]
        if _INTS in structure:
            return tensors[structure[_INTS]].tolist()
        if _TUPLE in structure:
            return tuple(rebuild(v, tensors) for v in structure[_TUPLE])
        if _DICT in structure:
            return {rebuild(k, tensors): rebuild(v, tensors) for k, v in structure[_DICT]}
        return {k: rebuild(v, tensors) for k, v in structure.items()}
    if isinstance(structure, list):
        return [rebuild(v, tensors) for v in structure]
    return structure


class StepSnapshots:
    """The trainer's per-step copy into its supervisor's slots (``directory`` from ``TELEPATHY_SNAPSHOT_DIR``).
    The destination views of each slot are made once and reused while the state keeps its layout (building
    a few views per tensor at every step costs more than copying a small state)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.writer = SlotWriter(directory, on_unmap=self._forget_views)
        self.disabled: str | None = None
        self._views: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # id(mapping) -> (layout, destinations)
        self._table_json: tuple[Any, bytes] = (None, b"")
        self._store_json: tuple[Any, bytes] = (None, b"")

    def capture(self, step: int, files: Mapping[str, Any], info: Mapping[str, Any], store: Mapping[str, Any],
                save_dir: str = "") -> None:  # fmt: skip
        if self.disabled is not None:
            return
        try:
            structure, tensors = describe(files)
        except UnsupportedState as exc:  # loud, once: the run goes on with interval saves only
            self.disabled = str(exc)
            log.error("per-step snapshots are off for this run: the training state holds %s, which a snapshot "
                      "cannot describe; a hard kill now loses up to one checkpoint interval", exc)  # fmt: skip
            return
        table, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            table.append([str(t.dtype), list(t.shape), offset, nbytes])
            offset = align(offset + nbytes)
        if self._table_json[0] != table:  # the table (dtypes, shapes, offsets) rarely changes: its JSON is kept
            self._table_json = (table, _json(table))
        if self._store_json[0] != (store, save_dir):
            self._store_json = ((dict(store), save_dir), _json(dict(store)) + b',"save_dir":' + _json(save_dir))
        meta = (b'{"files":' + _json(structure) + b',"info":' + _json(dict(info)) + b',"tensors":'
                + self._table_json[1] + b',"store":' + self._store_json[1] + b"}")  # fmt: skip

        def fill(mapping: Any, at: int, length: int) -> None:
            destinations = self._destinations(mapping, at, length, table)
            sources = [t for t, (_, _, _, n) in zip(tensors, table) if n]
            if sources:
                with torch.no_grad():  # (no detach: 177 of them cost more than the copy of a small state)
                    torch._foreach_copy_(destinations, sources)  # one call, not one per tensor

        self.writer.write(step, meta, offset, fill)

    def _destinations(self, mapping: Any, at: int, length: int, table: list[list[Any]]) -> list[torch.Tensor]:
        layout = (at, length, [(d, tuple(shape), off) for d, shape, off, _ in table])
        cached = self._views.get(id(mapping))
        if cached is not None and cached[0] == layout:
            return cached[1]
        whole = torch.frombuffer(mapping, dtype=torch.uint8, count=length, offset=at) if length else None
        views = [whole[off : off + n].view(_DTYPES[d]).view(shape) for d, shape, off, n in table if n]
        self._views[id(mapping)] = (layout, views)
        return views

    def _forget_views(self, mapping: Any) -> None:
        """Before the writer closes a mapping: no view of it may remain (the mapping refuses to close)."""
        self._views.pop(id(mapping), None)

    def close(self) -> None:
        self.writer.close()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def files_from_slot(meta: Mapping[str, Any], data: bytes) -> dict[str, Any]:
    """The ``files`` a save would have written, rebuilt from a slot's meta and bytes (each tensor its own copy)."""
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    tensors = []
    for dtype, shape, at, nbytes in meta["tensors"]:
        kind = _DTYPES[dtype]
        if nbytes:
            tensors.append(whole[at : at + nbytes].view(kind).view(shape).clone())
        else:
            tensors.append(torch.empty(shape, dtype=kind))
    return rebuild(meta["files"], tensors)


def from_environment(enabled: bool, several_ranks: bool) -> StepSnapshots | None:
    """The per-step snapshots a Checkpointer takes: on when asked for and a supervisor gave its slot directory."""
    if not enabled:
        return None
    if several_ranks:
        from telepathy.errors import UsageError  # noqa: PLC0415

        raise UsageError("snapshot_every_step is not supported with several ranks or sharded state yet; drop "
                         "--snapshot_every_step (interval and signal saves still work)")  # fmt: skip
    directory = os.environ.get(SLOT_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        log.warning("snapshot_every_step needs the supervising wrapper (python -m telepathy.preemptible_training "
                    "... -- your command) to hold the snapshots; without it a hard kill loses up to one "
                    "checkpoint interval")  # fmt: skip
        return None
    return StepSnapshots(directory)
