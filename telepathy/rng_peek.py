"""Read the global NumPy and Python generators' states straight from memory, for per-step snapshots.

``np.random.get_state()`` copies NumPy's 624 key words one at a time and ``random.getstate()`` builds a tuple of
625 ints: together about a tenth of a per-step snapshot's cost. Both states are plain C structs, so a snapshot
reads their bytes instead (two ``ctypes.string_at`` calls) and converts them only when they changed.

Where the structs lie is found once, by probing fresh generators whose states were set to known values, and
checked against ``get_state`` / ``getstate`` on the global generators themselves; any mismatch (another NumPy or
CPython layout) leaves :func:`peeker` returning None and the snapshot uses the ordinary calls. NumPy's legacy
Gaussian cache (``has_gauss``, ``gauss``) lives in the ``RandomState`` object, not in its bit generator: a draw that
consumes the cache changes nothing else, so the cache is read too. Only reads, never writes.
"""

from __future__ import annotations

import ctypes
import random
import struct
import sys
from typing import Any

import numpy as np
import torch

_MT_WORDS = 624
_MT_BYTES = 4 * _MT_WORDS + 4  # NumPy's mt19937_state: uint32 key[624]; int pos
_PY_BYTES = 4 + 4 * _MT_WORDS  # CPython's RandomObject after its header: int index; uint32 state[624]
_PY_AT = object.__basicsize__  # (the header: refcount and type)
_BITGEN_BYTES = 5 * ctypes.sizeof(ctypes.c_void_p)  # bitgen_t: the state pointer and four function pointers


class RngPeeker:
    """The global generators' states as :func:`telepathy.rng.capture_rng_state` reports them, read from memory.
    The 624-word keys come as int64 tensors of the peeker's own, converted only when the bytes changed and
    updated in place at a later call: a caller copies them before it asks again (a snapshot does)."""

    def __init__(self, numpy_state: np.random.RandomState, aug_at: int, python_state: random.Random) -> None:
        self._numpy, self._bit_generator = numpy_state, numpy_state._bit_generator
        self._mtrand = np.random.mtrand
        self._key_address = self._bit_generator.ctypes.state_address
        self._aug_address = id(numpy_state) + aug_at + 8  # has_gauss, padding, gauss
        self._python = python_state
        self._numpy_raw, self._python_raw = b"", b""
        self._numpy_key = np.zeros(_MT_WORDS, dtype=np.int64)
        self._numpy_key_tensor = torch.from_numpy(self._numpy_key)  # (shares the array's memory)
        self._numpy_fields: tuple[int, int, float] = (0, 0, 0.0)
        self._python_key = np.zeros(_MT_WORDS + 1, dtype=np.int64)  # the 624 words, then the index
        self._python_key_tensor = torch.from_numpy(self._python_key)

    def current(self) -> bool:
        """Still the generators probed (nobody rebound ``np.random``'s or ``random``'s global instance)."""
        return (self._mtrand._rand is self._numpy and self._numpy._bit_generator is self._bit_generator
                and getattr(random.getstate, "__self__", None) is self._python)  # fmt: skip

    def numpy(self) -> dict[str, Any]:
        """NumPy's state in the form of ``capture_rng_state``'s ``"numpy"`` entry."""
        raw = ctypes.string_at(self._key_address, _MT_BYTES) + ctypes.string_at(self._aug_address, 16)
        if raw != self._numpy_raw:
            self._numpy_key[:] = np.frombuffer(raw, dtype=np.uint32, count=_MT_WORDS)
            self._numpy_fields = struct.unpack_from("=ii4xd", raw, 4 * _MT_WORDS)  # pos, has_gauss, gauss
            self._numpy_raw = raw
            _changed_in_place(self._numpy_key_tensor)
        pos, has_gauss, gauss = self._numpy_fields
        return {"bit_generator": "MT19937", "key": self._numpy_key_tensor, "pos": pos, "has_gauss": has_gauss,
                "gauss": gauss}  # fmt: skip

    def python(self) -> tuple[int, torch.Tensor, Any]:
        """Python's state as ``random.getstate()`` gives it, its 625 ints as an int64 tensor."""
        raw = ctypes.string_at(id(self._python) + _PY_AT, _PY_BYTES)
        if raw != self._python_raw:
            self._python_key[:_MT_WORDS] = np.frombuffer(raw, dtype=np.uint32, count=_MT_WORDS, offset=4)
            self._python_key[_MT_WORDS] = int.from_bytes(raw[:4], "little", signed=True)
            self._python_raw = raw
            _changed_in_place(self._python_key_tensor)
        return random.Random.VERSION, self._python_key_tensor, self._python.gauss_next


def _changed_in_place(tensor: torch.Tensor) -> None:
    """Bump the version counter of a tensor written through its NumPy array (which torch does not see): a
    snapshot's copy begun before this call (:mod:`telepathy.store.overlapped_copy`) sees that it must copy the
    tensor again."""
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(tensor)
    else:  # (older torch)
        tensor.add_(0)


def _aug_offset(state: np.random.RandomState) -> int | None:
    """Where a RandomState keeps its ``aug_bitgen_t``: the one word that points 40 bytes before itself, at its
    own ``bitgen_t`` (``_aug_state.bit_generator = &self._bitgen``)."""
    address = id(state)
    found = [at for at in range(_PY_AT, type(state).__basicsize__ - 24, ctypes.sizeof(ctypes.c_void_p))
             if ctypes.c_void_p.from_address(address + at).value == address + at - _BITGEN_BYTES]  # fmt: skip
    return found[0] if len(found) == 1 else None


def _agrees(peek: RngPeeker) -> bool:
    """The peeked states equal the ordinary calls' on the generators as they are now."""
    state = peek._numpy.get_state(legacy=False)
    mine = peek.numpy()
    version, internal, gauss_next = peek._python.getstate()
    my_version, packed, my_gauss_next = peek.python()
    return (
        mine["key"].tolist() == state["state"]["key"].tolist() and mine["pos"] == state["state"]["pos"]
        and mine["has_gauss"] == state["has_gauss"] and mine["gauss"] == state["gauss"]
        and (my_version, packed.tolist(), my_gauss_next) == (version, list(internal), gauss_next)
    )  # fmt: skip


def _probe() -> RngPeeker | None:
    """Locate the structs on fresh generators set to known states (the Gaussian cache full and empty), then
    check the layout on the global ones. CPython only: elsewhere ``id`` is not an address."""
    if sys.implementation.name != "cpython":
        return None
    numpy_global = np.random.mtrand._rand
    python_global = getattr(random.getstate, "__self__", None)
    if type(numpy_global) is not np.random.RandomState or type(numpy_global._bit_generator) is not np.random.MT19937:
        return None
    if type(python_global) is not random.Random or random.Random.__basicsize__ < _PY_AT + _PY_BYTES:
        return None
    fresh_numpy, fresh_python = np.random.RandomState(), random.Random()
    at = _aug_offset(fresh_numpy)
    if at is None or _aug_offset(numpy_global) != at:
        return None
    probe = RngPeeker(fresh_numpy, at, fresh_python)
    key = np.arange(7, 7 + _MT_WORDS, dtype=np.uint32)
    for has_gauss, gauss, pos in ((1, 0.123456789012345, 5), (0, -2.5e-300, 624)):
        fresh_numpy.set_state(("MT19937", key, pos, has_gauss, gauss))
        fresh_python.setstate((random.Random.VERSION, (*range(11, 11 + _MT_WORDS), pos), gauss))
        if not _agrees(probe):
            return None
    peek = RngPeeker(numpy_global, at, python_global)
    return peek if _agrees(peek) else None


_peeker: list[RngPeeker | None] = []  # probed once per process


def peeker() -> RngPeeker | None:
    """The peeker of this process's global generators, or None where their layout is not the expected one."""
    if not _peeker:
        try:
            _peeker.append(_probe())
        except (AttributeError, TypeError, ValueError, OverflowError):
            _peeker.append(None)
    peek = _peeker[0]
    return peek if peek is not None and peek.current() else None
