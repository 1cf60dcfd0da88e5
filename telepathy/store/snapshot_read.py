"""Reading a step snapshot back (the supervisor's side): :func:`files_from_slot` checks that a slot's meta
describes its bytes the way a trainer writes them (:mod:`telepathy.store.snapshot_format`) and rebuilds the
``files`` a save would have written. Nothing in a slot is trusted: a damaged or hostile one is refused, never
committed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from telepathy.store.dtypes import DTYPES
from telepathy.store.snapshot_format import (
    _DICT,
    _FIXED,
    _INTS,
    _MAPPING_KINDS,
    _MARKERS,
    _PLAIN_SET,
    _ROW_KEYS,
    _SIZE,
    _TABLE,
    _TENSOR,
    _TENSORS,
    _VERSIONS,
    rebuild,
)


class SnapshotInvalid(ValueError):
    """A slot's meta does not describe its bytes the way a trainer writes them: never committed."""


_NUMBERS = frozenset({int, float, bool})


def files_from_slot(meta: Mapping[str, Any], data: bytes) -> dict[str, Any]:
    """The ``files`` a save would have written, rebuilt from a slot's meta and bytes (each tensor its own copy).
    Everything is checked first (raises :class:`SnapshotInvalid`): a table row per tensor with a known dtype, a
    shape of non-negative ints whose size is the row's byte count, rows in order inside the data without overlap,
    key sets of distinct plain values, and a structure that names each tensor exactly once."""
    rows, constants = meta.get("tensors"), meta.get("constants")
    if not isinstance(rows, list):
        raise SnapshotInvalid("the snapshot has no table of tensors")
    end = 0
    for i, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) == 4 and row[0] in DTYPES and isinstance(row[1], list)
        ok = ok and all(type(n) is int and n >= 0 for n in row[1]) and all(type(n) is int for n in row[2:])
        if not ok or row[3] != math.prod(row[1]) * DTYPES[row[0]].itemsize:
            raise SnapshotInvalid(f"tensor {i} of the snapshot has an implausible row {str(row)[:80]}")
        if row[3] and not (end <= row[2] and row[2] + row[3] <= len(data)):
            raise SnapshotInvalid(f"tensor {i} of the snapshot lies outside its data or over another tensor")
        end = row[2] + row[3] if row[3] else end
    if not isinstance(constants, list):
        raise SnapshotInvalid("the snapshot has no list of constants")
    _check_references(meta.get("files"), len(rows), constants)
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    tensors = []
    for dtype, shape, at, nbytes in rows:
        kind = DTYPES[dtype]
        if nbytes:
            tensors.append(whole[at : at + nbytes].view(kind).view(shape).clone())
        else:
            tensors.append(torch.empty(shape, dtype=kind))
    try:
        files = rebuild(meta["files"], tensors, constants)
    except (TypeError, ValueError, KeyError, IndexError) as exc:  # (a node the walk let through, rebuilt wrongly)
        raise SnapshotInvalid(f"the snapshot's structure cannot be rebuilt: {str(exc)[:120]}") from None
    if type(files) is not dict:
        raise SnapshotInvalid("the snapshot's structure is not a mapping of files")
    return files


def _check_references(structure: Any, count: int, constants: list[Any]) -> None:
    """Every tensor and constant a snapshot's structure names in range and of its kind (key sets: lists of
    distinct plain values; module versions: names to plain values), and each of the ``count`` tensors named once
    (two references to one tensor would alias after a resume). A fixed value or module versions is named once
    too (each reference is rebuilt as a copy: a small meta naming a big one many times would be a huge state)."""
    seen: set[int] = set()
    named_once: set[int] = set()
    pending = [structure]

    def take(first: Any, n: int) -> None:
        if type(first) is not int or first < 0 or first + n > count or seen.intersection(range(first, first + n)):
            raise SnapshotInvalid(f"the snapshot's structure names tensors {first}..+{n} of {count} wrongly")
        seen.update(range(first, first + n))

    def constant(k: Any, kind: str) -> Any:
        if type(k) is not int or not 0 <= k < len(constants):
            raise SnapshotInvalid(f"the snapshot's structure names constant {str(k)[:20]}: there is none")
        value = constants[k]
        if kind != "keys":
            if k in named_once:
                raise SnapshotInvalid(f"the snapshot's structure names constant {k} ({kind}) twice")
            named_once.add(k)
        if kind == "fixed":  # {"value": a plain value; what it holds is checked by the caller}
            if not (isinstance(value, dict) and list(value) == ["value"]):
                raise SnapshotInvalid(f"the snapshot's fixed value {str(k)[:20]} is not one")
            return value["value"]
        keys = isinstance(value, list) and set(map(type, value)) <= _ROW_KEYS and len(set(value)) == len(value)
        versions = isinstance(value, dict) and all(
            isinstance(v, dict)
            and set(map(type, v.values())) <= _PLAIN_SET
            and type(v.get("version", 0)) in _NUMBERS  # (a float version too, as a save keeps it)
            for v in value.values()
        )
        if not (keys if kind == "keys" else versions):
            raise SnapshotInvalid(f"the snapshot's structure names constant {str(k)[:20]} as {kind}: not that")
        return value

    try:
        _walk_references(pending, take, constant)
    except SnapshotInvalid:
        raise
    except (TypeError, ValueError) as exc:
        raise SnapshotInvalid(f"the snapshot's structure: {exc}") from None
    if len(seen) != count:
        raise SnapshotInvalid(f"the snapshot's structure names {len(seen)} of its {count} tensors")


def _names_nothing(*_: Any) -> Any:
    raise SnapshotInvalid("the snapshot's fixed value names tensors or constants")


def _walk_references(pending: list[Any], take: Any, constant: Any) -> None:
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            markers = [k for k in node if type(k) is str and k.startswith("__")]
            if not markers:
                pending.extend(node.values())
                continue
            if len(node) != 1 or markers[0] not in _MARKERS:
                raise SnapshotInvalid(f"the snapshot's structure has a node {str(list(node))[:60]}")
            marker, value = markers[0], node[markers[0]]
            if marker in (_TENSOR, _INTS):
                take(value, 1)
            elif marker == _TENSORS:
                first, k = value
                take(first, len(constant(k, "keys")))
            elif marker == _TABLE:
                first, k_rows, k_columns = value
                take(first, len(constant(k_rows, "keys")) * len(constant(k_columns, "keys")))
            elif marker == _FIXED:  # plain values only: no tensors, no further constants
                _walk_references([constant(value, "fixed")], _names_nothing, _names_nothing)
            elif marker == _VERSIONS:
                k, inner = value
                constant(k, "versions")
                if not isinstance(inner, dict):
                    raise SnapshotInvalid("the snapshot's module versions go with something other than a mapping")
                pending.append(inner)
            elif marker in _MAPPING_KINDS:
                if not isinstance(value, dict):
                    raise SnapshotInvalid(f"the snapshot's {marker} node holds {str(value)[:40]}")
                pending.append(value)
            elif marker == _SIZE and not (isinstance(value, list) and all(type(n) is int and 0 <= n < 2**63
                                                                          for n in value)):  # fmt: skip
                raise SnapshotInvalid(f"the snapshot's torch.Size node holds {str(value)[:40]}")
            elif not isinstance(value, list) or (marker == _DICT and not all(len(p) == 2 for p in value)):
                raise SnapshotInvalid(f"the snapshot's {marker} node holds {str(value)[:40]}")
            else:
                pending.extend(value)
