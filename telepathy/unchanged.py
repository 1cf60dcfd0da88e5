"""Cheap proofs that nothing changed since the last step, for the per-step snapshot: a dict's version tag (CPython
gives every change to a dict a new one) and a check of many tensors' dtypes, shapes and strides in one C call.
Both come from torch's compiler (``torch._C._dynamo.guards``), a private API: each is tried once on known
changes before it is trusted, and where it is missing or does not see them the callers do the full work at every
step (slower, never wrong). On the default workload they take a snapshot's state walk and layout check from
about 0.5 to 0.1 ms."""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch


@functools.cache
def dict_version() -> Callable[[dict[Any, Any]], int] | None:
    """``dict_version(d)``: a number that changes whenever ``d`` is changed (an item set, replaced or removed) and
    is not shared with another dict's state; or None where this torch or Python has no such tag."""
    try:
        from torch._C._dynamo.guards import dict_version as version  # noqa: PLC0415
    except (ImportError, AttributeError):
        return None
    try:
        a, b = {}, OrderedDict()
        seen = [version(a), version(b)]
        a["x"] = 1
        seen.append(version(a))
        a["x"] = 2  # (same key, new value)
        seen.append(version(a))
        b["x"] = a.pop("x")
        seen += [version(a), version(b)]
        seen_again = [version(a), version(b)]
    except Exception:  # noqa: BLE001 (any failure: not trusted)
        return None
    if len(set(seen[1:])) != len(seen) - 1 or seen_again != seen[-2:] or not all(type(v) is int for v in seen):
        return None
    return version


class TensorLayouts:
    """Whether a list of tensors still has the dtypes, shapes, strides and kinds (sparse or not, device, Python
    type, ``requires_grad``) it had when this was made: one C call for all of them. ``same`` may say False when
    nothing that matters changed (it also compares the thread's grad mode): the caller then compares its own
    key, as it would without this."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.count = len(tensors)
        self._guards = _make_guards(tensors) if _guards_work() else None

    def same(self, tensors: Sequence[torch.Tensor]) -> bool:
        if self._guards is None or len(tensors) != self.count:
            return False
        try:
            return bool(self._guards.check(*tensors))
        except Exception:  # noqa: BLE001 (a changed API: the caller's own check decides)
            return False


def _make_guards(tensors: Sequence[torch.Tensor]) -> Any:
    try:
        from torch._C._dynamo.guards import TensorGuards  # noqa: PLC0415

        # (the keywords are required: without them the C code reads a missing dict and crashes)
        return TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except Exception:  # noqa: BLE001
        return None


@functools.cache
def _guards_work() -> bool:
    """Tried on the changes a step snapshot must see (a tensor resized, transposed, given another dtype, made
    sparse, replaced by one of another shape) and on no change."""
    base = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(3, 3)]
    guards = _make_guards(base)
    if guards is None:
        return False
    changed = [
        [torch.zeros(3, 2), *base[1:]],
        [base[0], torch.zeros(4, dtype=torch.float64), base[2]],
        [*base[:2], torch.zeros(3, 3).t()],
        [base[0], torch.zeros(4).to_sparse(), base[2]],
        [base[0], base[1], torch.zeros(3, 3, dtype=torch.int64)],
    ]
    try:
        return guards.check(*base) is True and not any(guards.check(*c) for c in changed)
    except Exception:  # noqa: BLE001
        return False


_PLAIN = frozenset({type(None), bool, int, float, str})


class PlainTree:
    """Whether a tree of dicts, lists and tuples of plain values (None, bool, int, float, str) is still the one
    seen: the same roots, each dict's version tag, each list's items (the same objects). :meth:`of` gives None
    for a tree holding anything else (an array or object changed in place would not be seen) or more than
    ``limit`` values, or where dicts have no version tags."""

    def __init__(self, roots: tuple[Any, ...], dicts: list[dict[Any, Any]], lists: list[list[Any]],
                 version: Callable[[dict[Any, Any]], int]) -> None:  # fmt: skip
        self.roots, self.dicts, self.version = roots, dicts, version
        self.versions = list(map(version, dicts))
        self.lists = [(items, list(items)) for items in lists]

    @classmethod
    def of(cls, *roots: Any, limit: int = 10_000) -> PlainTree | None:
        version = dict_version()
        if version is None:
            return None
        dicts: list[dict[Any, Any]] = []
        lists: list[list[Any]] = []
        pending, seen = list(roots), 0
        while pending:
            value = pending.pop()
            seen += 1
            kind = type(value)
            if seen > limit:
                return None
            if kind in _PLAIN:
                continue
            if kind is dict:
                dicts.append(value)
                pending.extend(value)
                pending.extend(value.values())
            elif kind is list:
                lists.append(value)
                pending.extend(value)
            elif kind is tuple:
                pending.extend(value)
            else:
                return None
        return cls(roots, dicts, lists, version)

    def holds(self, *roots: Any) -> bool:
        return (
            len(roots) == len(self.roots)
            and all(map(operator.is_, roots, self.roots))
            and list(map(self.version, self.dicts)) == self.versions
            and all(len(items) == len(seen) and all(map(operator.is_, items, seen)) for items, seen in self.lists)
        )
