"""Each step's training state, copied into a shared-memory slot (:mod:`telepathy.disk.slots`) and rebuilt from it.

The copy is the only per-step cost to the training loop: one ``copy_`` per tensor into a preallocated mapping
(no pickling, no hashing, no disk) and a small JSON description of the rest (positions, RNG states, optimizer
hyper-parameters). If the trainer dies, its supervisor rebuilds the same ``files`` a normal save would write
and commits them with the normal atomic protocol; the resumed run is then bit-identical to one that was never
killed, one step in flight lost at most.
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from telepathy import tree
from telepathy.disk.slots import SLOT_DIR_ENV, SlotWriter, align, is_slot_dir

log = logging.getLogger("telepathy")

_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
                               torch.complex128)}  # fmt: skip
_DTYPE_SET = frozenset(_DTYPES.values())
_TENSOR, _TENSORS, _TABLE = "__T__", "__TS__", "__TT__"
_TUPLE, _DICT, _INTS = "__t__", "__d__", "__L__"
_LONG_LIST = 32  # a list of this many ints or more (Python's RNG state: 625) is copied as one int64 tensor
_PLAIN = (type(None), bool, int, float, str)


class UnsupportedState(TypeError):
    """The state holds a value a slot cannot describe (only tensors, containers and plain values)."""


def describe(files: Mapping[str, Any], check: bool = True) -> tuple[Any, list[torch.Tensor]]:
    """The JSON-able structure of ``files`` with each tensor replaced by its index in the returned list. A dict
    of tensors (a module's state dict, a parameter's optimizer state: most of the state) is one node naming its
    keys and its first index. ``check=False`` skips the per-tensor checks of dtype and layout (the caller
    checks them only when the tensors' layout changed)."""
    tensors: list[torch.Tensor] = []

    def tensor(value: torch.Tensor, path: str) -> None:
        if check and (value.dtype not in _DTYPE_SET or value.layout != torch.strided):
            raise UnsupportedState(
                f"{path}: a {value.dtype} tensor{'' if value.layout == torch.strided else ' (sparse)'}"
            )
        tensors.append(value)

    def tensor_dict(value: dict[Any, torch.Tensor], path: str) -> dict[str, Any] | None:
        keys = list(value)
        if not all(type(k) is str and not k.startswith("__") for k in keys):
            return None
        first = len(tensors)
        if check:
            for k, v in value.items():
                tensor(v, f"{path}/{k}")
        else:
            tensors.extend(value.values())
        return {_TENSORS: [first, keys]}

    def tensor_table(value: dict[Any, Any], path: str) -> dict[str, Any] | None:
        """An optimizer's per-parameter state: rows of tensor dicts with the same keys (a node, not a row each)."""
        rows = list(value.values())
        if not rows or type(rows[0]) is not dict:
            return None
        columns = list(rows[0])
        if not (all(type(k) in _PLAIN for k in value) and all(type(r) is dict and list(r) == columns for r in rows)
                and all(type(t) is torch.Tensor for r in rows for t in r.values())):  # fmt: skip
            return None
        if not all(type(k) is str and not k.startswith("__") for k in columns):
            return None
        first = len(tensors)
        if check:
            for key, row in value.items():
                for column, v in row.items():
                    tensor(v, f"{path}/{key}/{column}")
        else:
            for row in rows:
                tensors.extend(row.values())
        return {_TABLE: [first, list(value), columns]}

    def leaf(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensor(value, path)
            return {_TENSOR: len(tensors) - 1}
        if type(value) in _PLAIN:
            return value
        if isinstance(value, dict) and value:
            values = value.values()
            if all(type(v) is torch.Tensor for v in values):
                node = tensor_dict(value, path)
            elif all(type(v) in _PLAIN for v in values):
                node = value if all(type(k) is str and not k.startswith("__") for k in value) else None
            else:
                node = tensor_table(value, path)
            if node is not None:
                return node
        if type(value) is list and len(value) < _LONG_LIST and all(type(v) in _PLAIN for v in value):
            return value  # (JSON keeps each plain value's type)
        if isinstance(value, tuple):
            return {_TUPLE: [tree.transform(v, leaf, path=f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            if all(type(k) is str and not k.startswith("__") for k in value):
                return tree.KEEP
            return {_DICT: [[k if type(k) in _PLAIN else tree.transform(k, leaf),
                             tree.transform(v, leaf, path=f"{path}/{k}")] for k, v in value.items()]}  # fmt: skip
        if type(value) is list:
            if len(value) >= _LONG_LIST and set(map(type, value)) == {int}:  # ints only (no bools, no floats)
                try:
                    tensors.append(torch.frombuffer(array.array("q", value), dtype=torch.int64))
                except OverflowError:  # an int past 64 bits: kept as a list
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
        if _TENSORS in structure:
            first, keys = structure[_TENSORS]
            return dict(zip(keys, tensors[first : first + len(keys)], strict=True))
        if _TABLE in structure:
            first, keys, columns = structure[_TABLE]
            width = len(columns)
            rows = [tensors[first + i * width : first + (i + 1) * width] for i in range(len(keys))]
            return {
                rebuild(key, tensors): dict(zip(columns, row, strict=True)) for key, row in zip(keys, rows, strict=True)
            }
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


class _Layout:
    """The tensors' dtypes, shapes and places in a slot, with the JSON of that table: remade only when a tensor
    changes dtype, shape or layout (the optimizer's state appears, a model grows), not at every step."""

    def __init__(self, key: list[tuple[Any, ...]], tensors: list[torch.Tensor]) -> None:
        self.key = key
        table, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            table.append([str(t.dtype), list(t.shape), offset, nbytes])
            offset = align(offset + nbytes)
        self.data_len = offset
        self.table_json = _json(table)
        self.non_empty = [n > 0 for _, _, _, n in table]
        self.all_non_empty = all(self.non_empty)
        self.views = [(_DTYPES[d], tuple(shape), at, n) for d, shape, at, n in table if n]


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
        self._store_json: tuple[Any, bytes] = (None, b"")

    def capture(self, step: int, files: Mapping[str, Any], info: Mapping[str, Any], store: Mapping[str, Any],
                save_dir: str = "") -> None:  # fmt: skip
        if self.disabled is not None:
            return
        try:
            structure, tensors = describe(files, check=False)
            key = [(t.dtype, t.shape, t.layout) for t in tensors]
            if self._layout is None or self._layout.key != key:
                describe(files, check=True)  # names the first tensor a slot cannot hold
                self._layout = _Layout(key, tensors)
        except UnsupportedState as exc:  # loud, once: the run goes on with interval saves only
            self.disabled = str(exc)
            log.error("per-step snapshots are off for this run: the training state holds %s, which a snapshot "
                      "cannot describe; a hard kill now loses up to one checkpoint interval", exc)  # fmt: skip
            return
        layout = self._layout
        if self._store_json[0] != (store, save_dir):
            self._store_json = ((dict(store), save_dir), _json(dict(store)) + b',"save_dir":' + _json(save_dir))
        meta = (b'{"files":' + _json(structure) + b',"info":' + _json(dict(info)) + b',"tensors":'
                + layout.table_json + b',"store":' + self._store_json[1] + b"}")  # fmt: skip

        def fill(mapping: Any, at: int, length: int) -> None:
            destinations = self._destinations(mapping, at, length, layout)
            sources = tensors if layout.all_non_empty else list(itertools.compress(tensors, layout.non_empty))
            if sources:
                with torch.no_grad():  # (no detach: 177 of them cost more than the copy of a small state)
                    torch._foreach_copy_(destinations, sources)  # one call, not one per tensor

        try:
            self.writer.write(step, meta, layout.data_len, fill)
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
        self.writer.close()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class SnapshotInvalid(ValueError):
    """A slot's meta does not describe its bytes the way a trainer writes them: never committed."""


def files_from_slot(meta: Mapping[str, Any], data: bytes) -> dict[str, Any]:
    """The ``files`` a save would have written, rebuilt from a slot's meta and bytes (each tensor its own copy).
    Everything is checked first (raises :class:`SnapshotInvalid`): a table row per tensor with a known dtype, a
    shape of non-negative ints whose size is the row's byte count, rows in order inside the data without overlap,
    and a structure that names each tensor exactly once."""
    rows = meta.get("tensors")
    if not isinstance(rows, list):
        raise SnapshotInvalid("the snapshot has no table of tensors")
    end = 0
    for i, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) == 4 and row[0] in _DTYPES and isinstance(row[1], list)
        ok = ok and all(type(n) is int and n >= 0 for n in row[1]) and all(type(n) is int for n in row[2:])
        if not ok or row[3] != math.prod(row[1]) * _DTYPES[row[0]].itemsize:
            raise SnapshotInvalid(f"tensor {i} of the snapshot has an implausible row {str(row)[:80]}")
        if row[3] and not (end <= row[2] and row[2] + row[3] <= len(data)):
            raise SnapshotInvalid(f"tensor {i} of the snapshot lies outside its data or over another tensor")
        end = row[2] + row[3] if row[3] else end
    _check_references(meta.get("files"), len(rows))
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    tensors = []
    for dtype, shape, at, nbytes in rows:
        kind = _DTYPES[dtype]
        if nbytes:
            tensors.append(whole[at : at + nbytes].view(kind).view(shape).clone())
        else:
            tensors.append(torch.empty(shape, dtype=kind))
    return rebuild(meta["files"], tensors)


def _check_references(structure: Any, count: int) -> None:
    """Every tensor reference of a snapshot's structure in range, and each of the ``count`` tensors named once
    (two references to one tensor would alias after a resume)."""
    seen: set[int] = set()
    pending = [structure]

    def take(first: Any, n: int) -> None:
        if type(first) is not int or first < 0 or first + n > count or seen.intersection(range(first, first + n)):
            raise SnapshotInvalid(f"the snapshot's structure names tensors {first}..+{n} of {count} wrongly")
        seen.update(range(first, first + n))

    try:
        _walk_references(pending, take)
    except SnapshotInvalid:
        raise
    except (TypeError, ValueError) as exc:
        raise SnapshotInvalid(f"the snapshot's structure: {exc}") from None
    if len(seen) != count:
        raise SnapshotInvalid(f"the snapshot's structure names {len(seen)} of its {count} tensors")


def _walk_references(pending: list[Any], take: Any) -> None:
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            if _TENSOR in node:
                take(node[_TENSOR], 1)
            elif _INTS in node:
                take(node[_INTS], 1)
            elif _TENSORS in node:
                first, keys = node[_TENSORS]
                take(first, len(keys))
            elif _TABLE in node:
                first, keys, columns = node[_TABLE]
                take(first, len(keys) * len(columns))
                pending.extend(keys)
            else:
                pending.extend(node.values())


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
