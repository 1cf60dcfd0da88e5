"""How a step snapshot lays out the training state: :func:`describe` turns the ``files`` a save would write into
a small JSON structure, the tensors to copy and the constants (what changes only with the state's layout);
:mod:`telepathy.store.snapshot_read` checks a slot's meta and bytes and rebuilds those ``files`` (the supervisor's
side).

Only tensors, containers and plain values can be described; JSON keeps each plain value's type (an int stays an
int, a float its exact value, a tuple is marked as one), so the rebuilt state is the captured one, bit for bit.
"""

from __future__ import annotations

import array
import functools
import itertools
import json
from collections import Counter, OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from telepathy import tree
from telepathy.rng import PackedInts
from telepathy.store.dtypes import DTYPES
from telepathy.store.known_dicts import KnownDicts

_DTYPE_SET = frozenset(DTYPES.values())
_TENSOR, _TENSORS, _TABLE = "__T__", "__TS__", "__TT__"
_TUPLE, _DICT, _INTS, _VERSIONS = "__t__", "__d__", "__L__", "__V__"
_ORDERED, _COUNTER, _SET, _SIZE = "__O__", "__C__", "__s__", "__S__"  # kinds a full save keeps (tree.transform)
_FIXED = "__K__"  # a tree.Fixed value: its description is a constant
_MAPPING_KINDS = {_ORDERED: OrderedDict, _COUNTER: Counter}
_MARKERS = frozenset({_TENSOR, _TENSORS, _TABLE, _TUPLE, _DICT, _INTS, _VERSIONS, *_MAPPING_KINDS, _SET, _SIZE,
                      _FIXED})  # fmt: skip
_LONG_LIST = 32  # a list of this many ints or more (Python's RNG state: 625) is copied as one int64 tensor
_PLAIN = (type(None), bool, int, float, str)
_PLAIN_SET = frozenset(_PLAIN)
_STR, _ROW_KEYS = frozenset({str}), frozenset({int, str})  # key sets hold these only: equal ones have equal types
_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})  # (a module's state dict with keep_vars=True)
_DICT_ONLY = frozenset({dict})  # (an optimizer table's rows)


class UnsupportedState(TypeError):
    """The state holds a value a slot cannot describe (only tensors, containers and plain values)."""


def describe(files: Mapping[str, Any], check: bool = True, fixed_cache: dict[int, tuple[Any, Any]] | None = None,
             pack_ints: bool = True, known: KnownDicts | None = None
             ) -> tuple[Any, list[torch.Tensor], list[Any]]:  # fmt: skip
    """The JSON-able structure of ``files``, the tensors it holds (each replaced in the structure by its index in
    that list) and its constants. A dict of tensors (a module's state dict, a parameter's optimizer state: most of
    the state) is one node naming its first tensor and its keys. What changes only when the state changes layout
    is an index into the constants, so that a step's structure stays small: key sets, and the module versions a
    state dict carries (``_metadata``, see :func:`telepathy.tree.module_versions`). ``check=False`` skips the
    per-tensor checks of dtype and layout (the caller checks them only when the tensors' layout changed).
    A :class:`telepathy.tree.Fixed` value is a constant too, described once per object (``fixed_cache``, the
    caller's, keyed by ``id``; described again when ``check``); one holding tensors is described in place.
    ``pack_ints=False``: long lists of ints stay lists (no tensor). ``known`` (the caller's, without ``check``):
    dicts of tensors described at an earlier call and unchanged since are described from what it remembers.

    It walks on its own rather than through :func:`telepathy.tree.transform`: it runs at every training step, and
    the generic walker's call and path string per value were most of its cost."""
    tensors: list[torch.Tensor] = []
    constants: list[Any] = []
    keysets: dict[tuple[Any, ...], int] = {}

    def keyset(keys: tuple[Any, ...]) -> int:
        at = keysets.get(keys)
        if at is None:
            at = keysets[keys] = len(constants)
            constants.append(keys)
        return at

    def module_versions(versions: Any, node: Any, path: str) -> Any:
        if check and not (isinstance(versions, Mapping) and all(
            type(k) is str and type(v) is dict and set(map(type, v.values())) <= _PLAIN_SET and _plain_names(tuple(v))
            for k, v in versions.items()
        )):  # fmt: skip
            raise UnsupportedState(f"{path}: a state dict whose _metadata is not module names and plain values")
        constants.append(versions)
        return {_VERSIONS: [len(constants) - 1, node]}

    def fixed(value: tree.Fixed, path: str) -> dict[str, int]:
        cached = None if fixed_cache is None or check else fixed_cache.get(id(value))
        if cached is None or cached[0] is not value:
            # (in a list: a dict of dicts of tensors directly under "value" would be read as an optimizer table)
            inner, held, inner_constants = describe({"value": [value.value]}, check=True, pack_ints=False)
            copied = json.loads(json.dumps(inner["value"][0]))  # (a copy: a plain dict's node is the dict itself)
            cached = (value, None if held or inner_constants else Once({"value": copied}))
            if fixed_cache is not None:
                if len(fixed_cache) > 64:  # (values made again after a change: the old ones go)
                    fixed_cache.clear()
                fixed_cache[id(value)] = cached
        if cached[1] is None:  # tensors or state dicts inside: described in place, at every step
            return walk(value.value, path)
        constants.append(cached[1])
        return {_FIXED: len(constants) - 1}

    def tensor(value: torch.Tensor, path: str) -> None:
        if check and (value.dtype not in _DTYPE_SET or value.layout != torch.strided or value.is_meta
                      or value.is_nested):  # fmt: skip
            kind = (" (nested)" if value.is_nested else " (sparse)" if value.layout != torch.strided
                    else " on the meta device (no data)" if value.is_meta else "")  # fmt: skip
            raise UnsupportedState(f"{path}: a {value.dtype} tensor{kind}")
        tensors.append(value)

    def tensor_dict(value: dict[Any, torch.Tensor], path: str) -> dict[str, Any] | None:
        keys = tuple(value)
        if not _plain_names(keys):
            return None
        first = len(tensors)
        if check:
            for k, v in value.items():
                tensor(v, f"{path}/{k}")
        else:
            tensors.extend(value.values())
            if known is not None:
                known.remember(value, keys, tensors[first:])
        return {_TENSORS: [first, keyset(keys)]}

    def tensor_table(value: dict[Any, Any], path: str) -> dict[str, Any] | None:
        """An optimizer's per-parameter state: rows of tensor dicts with the same keys (a node, not a row each)."""
        rows = list(value.values())
        columns = tuple(rows[0])
        if not (set(map(type, rows)) == _DICT_ONLY and all(map(columns.__eq__, map(tuple, rows)))
                and set(map(type, value)) <= _ROW_KEYS and _plain_names(columns)):  # fmt: skip
            return None
        cells = list(itertools.chain.from_iterable(map(dict.values, rows)))  # (map: no Python frame per row)
        if not set(map(type, cells)) <= _TENSOR_TYPES:
            return None
        first = len(tensors)
        if check:
            for key, row in value.items():
                for column, v in row.items():
                    tensor(v, f"{path}/{key}/{column}")
        else:
            tensors.extend(cells)
            if known is not None:
                known.remember(value, tuple(value), cells, columns)
        return {_TABLE: [first, keyset(tuple(value)), keyset(columns)]}

    def mapping(value: Mapping[Any, Any], path: str) -> Any:
        node = mapping_node(value, path)
        versions = tree.module_versions(value)
        if versions is not None:
            return module_versions(versions, node, path)
        kind = type(value)
        if kind is dict:
            return node
        if kind not in tree.KEPT_MAPPINGS:  # (a save refuses it too: a resume could not load it back)
            raise UnsupportedState(f"{path}: a {kind.__name__}")
        return {_ORDERED if kind is OrderedDict else _COUNTER: node}

    def mapping_node(value: Mapping[Any, Any], path: str) -> Any:
        if known is not None and isinstance(value, dict):
            seen = known.get(value)
            if seen is not None:  # (unchanged since an earlier step: its types were looked at then)
                first = len(tensors)
                tensors.extend(seen.tensors)
                if seen.columns is None:
                    return {_TENSORS: [first, keyset(seen.keys)]}
                return {_TABLE: [first, keyset(seen.keys), keyset(seen.columns)]}
        if isinstance(value, dict) and value:
            types = set(map(type, value.values()))
            node = None
            if types <= _TENSOR_TYPES:
                node = tensor_dict(value, path)
            elif types <= _PLAIN_SET:
                node = value if _plain_names(tuple(value)) else None
            elif type(next(iter(value.values()))) is dict:
                node = tensor_table(value, path)
            if node is not None:
                return node
        if _plain_names(tuple(value)):
            return {k: v if type(v) in _PLAIN_SET else walk(v, f"{path}/{k}") for k, v in value.items()}
        return {_DICT: [[k if type(k) in _PLAIN_SET else walk(k, path), walk(v, f"{path}/{k}")]
                        for k, v in value.items()]}  # fmt: skip

    def walk(value: Any, path: str) -> Any:
        kind = type(value)
        if kind in _PLAIN_SET:
            return value
        if kind in _TENSOR_TYPES or isinstance(value, torch.Tensor):
            tensor(value, path)
            return {_TENSOR: len(tensors) - 1}
        if kind is dict or kind is OrderedDict or isinstance(value, Mapping):
            return mapping(value, path)
        if kind is tree.Fixed:
            return fixed(value, path)
        if kind is PackedInts:  # a long list of ints the caller packed already (Python's RNG state)
            tensor(value.tensor, path)
            return {_INTS: len(tensors) - 1}
        if kind is list:
            types = set(map(type, value))
            if pack_ints and len(value) >= _LONG_LIST and types == {int}:  # ints only (no bools): one int64 tensor
                try:
                    tensors.append(_ints_tensor(value))
                    return {_INTS: len(tensors) - 1}
                except OverflowError:  # an int past 64 bits: kept as a list
                    pass
            if types <= _PLAIN_SET:
                return list(value)  # (JSON keeps each plain value's type)
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if kind is set:
            return {_SET: [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if tree.is_size(kind):
            return {_SIZE: list(value)}
        if kind is tuple:
            return {_TUPLE: [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        raise UnsupportedState(f"{path}: a value of type {type(value).__name__}")

    if known is not None:
        known.start()
    structure = mapping(dict(files), "")
    if known is not None:
        known.finish()
    return structure, tensors, constants


class Once(dict):
    """A Fixed value's description among a snapshot's constants, equal only to itself: a new Fixed (its value
    changed, even to one ``==`` the old: 1.0 for 1) makes the layout, and its JSON, new."""

    __slots__ = ()
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = None  # type: ignore[assignment]


_INT_TENSORS: dict[tuple[int, ...], torch.Tensor] = {}  # a few recent lists (an optimizer's "params" indexes)


def _ints_tensor(values: list[int]) -> torch.Tensor:
    """A long list of ints as one int64 tensor, the same object while the list stays the same (so that the
    snapshot need not look at a new tensor's layout at every step). Raises OverflowError past 64 bits."""
    key = tuple(values)  # (ints only: equal is identical)
    packed = _INT_TENSORS.get(key)
    if packed is None:
        packed = torch.frombuffer(array.array("q", values), dtype=torch.int64)
        if len(_INT_TENSORS) >= 16:
            _INT_TENSORS.clear()
        _INT_TENSORS[key] = packed
    return packed


def _plain_names(keys: tuple[Any, ...]) -> bool:
    """Keys a JSON object can carry as they are: strings (not a subclass: an Enum's would come back a plain str)
    that cannot be mistaken for this module's markers."""
    return set(map(type, keys)) <= _STR and _no_markers(keys)


@functools.lru_cache(maxsize=256)
def _no_markers(keys: tuple[str, ...]) -> bool:
    """(Cached: the same state dicts' keys come back at every step.)"""
    return not any(k.startswith("__") for k in keys)


def rebuild(structure: Any, tensors: list[torch.Tensor], constants: list[Any]) -> Any:
    """The inverse of :func:`describe`."""
    if isinstance(structure, dict):
        if _TENSOR in structure:
            return tensors[structure[_TENSOR]]
        if _TENSORS in structure:
            first, k = structure[_TENSORS]
            keys = constants[k]
            return dict(zip(keys, tensors[first : first + len(keys)], strict=True))
        if _TABLE in structure:
            first, k_rows, k_columns = structure[_TABLE]
            keys, columns = constants[k_rows], constants[k_columns]
            width = len(columns)
            rows = [tensors[first + i * width : first + (i + 1) * width] for i in range(len(keys))]
            return {key: dict(zip(columns, row, strict=True)) for key, row in zip(keys, rows, strict=True)}
        if _INTS in structure:
            return tensors[structure[_INTS]].tolist()
        if _FIXED in structure:
            return rebuild(constants[structure[_FIXED]]["value"], tensors, constants)
        if _VERSIONS in structure:
            k, node = structure[_VERSIONS]
            return tree.with_module_versions(rebuild(node, tensors, constants), constants[k])
        if _TUPLE in structure:
            return tuple(rebuild(v, tensors, constants) for v in structure[_TUPLE])
        if _ORDERED in structure or _COUNTER in structure:
            ((marker, node),) = structure.items()
            inner = rebuild(node, tensors, constants)
            if type(inner) is not dict:
                raise ValueError(f"a {marker} node around a {type(inner).__name__}")
            return _MAPPING_KINDS[marker](inner)
        if _SET in structure:
            return {rebuild(v, tensors, constants) for v in structure[_SET]}
        if _SIZE in structure:
            return torch.Size(structure[_SIZE])
        if _DICT in structure:
            return {rebuild(k, tensors, constants): rebuild(v, tensors, constants) for k, v in structure[_DICT]}
        return {k: rebuild(v, tensors, constants) for k, v in structure.items()}
    if isinstance(structure, list):
        return [rebuild(v, tensors, constants) for v in structure]
    return structure
