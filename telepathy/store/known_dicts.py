"""Dicts of tensors a per-step snapshot described at an earlier step and that did not change since: a module's
state dict or an optimizer's per-parameter state kept between steps (:mod:`telepathy.module_state`). Their
description is made again from what was remembered, without looking at each key and value's type again (on cold
caches that look was a third of describing the state). Unchanged means: the same dict object with the same version
tag (:func:`telepathy.unchanged.dict_version`), and for an optimizer's table each row's tag too."""

from __future__ import annotations

from typing import Any

from telepathy.unchanged import dict_version


class _Known:
    __slots__ = ("value", "version", "keys", "columns", "rows", "row_versions", "tensors")


class KnownDicts:
    """What one call of ``describe`` remembers for the next: only the dicts it met (a dict made anew at every step
    is let go at the next one, with its tensors)."""

    def __init__(self) -> None:
        self.version = dict_version()
        self._known: dict[int, _Known] = {}  # what the last call met
        self._met: dict[int, _Known] = {}  # what this call met so far

    def start(self) -> None:
        self._met = {}

    def finish(self) -> None:
        self._known, self._met = self._met, {}

    def get(self, value: dict[Any, Any]) -> _Known | None:
        known = self._known.get(id(value))
        if known is None or known.value is not value or self.version(value) != known.version:
            return None
        if type(value) is not dict and tuple(value) != known.keys:  # (an OrderedDict reordered keeps its tag)
            return None
        if known.rows is not None and list(map(self.version, known.rows)) != known.row_versions:
            return None
        self._met[id(value)] = known
        return known

    def remember(self, value: dict[Any, Any], keys: tuple[Any, ...], tensors: list[Any],
                 columns: tuple[Any, ...] | None = None) -> None:  # fmt: skip
        """``value``'s keys and tensors in order; ``columns``: it is an optimizer's table (rows of plain dicts of
        tensors with these keys)."""
        if self.version is None:
            return
        known = _Known()
        known.value, known.version, known.keys, known.columns, known.tensors = (
            value,
            self.version(value),
            keys,
            columns,
            tensors,
        )
        known.rows = None if columns is None else list(value.values())
        known.row_versions = None if columns is None else list(map(self.version, known.rows))
        self._met[id(value)] = known
