"""Capture and restore every random number generator a training step can touch.

The captured state contains only tensors, ints, floats, strings and lists, so it round-trips through
``torch.load(weights_only=True)``: restoring RNG state never requires unpickling arbitrary objects.
"""

from __future__ import annotations

import array
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from telepathy import rng_peek


class PackedInts:
    """A list of ints held as an int64 tensor (``tensor.tolist()`` is the list). A per-step snapshot takes Python's
    RNG state (625 ints) in this form, so that it is converted only when it changed, not at every step. Only in a
    state handed to a snapshot (:mod:`telepathy.store.snapshot_format`), never in a saved file."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


_packed_python: tuple[tuple[int, ...], PackedInts] | None = None  # the last state packed, and its packing


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None, *, packed: bool = False
                      ) -> dict[str, Any]:  # fmt: skip
    """Snapshot Python ``random``, NumPy's global generator, torch CPU, each CUDA device (when CUDA is
    initialised) and the caller's named ``torch.Generator`` objects. ``packed``: Python's state as
    :class:`PackedInts` (for a per-step snapshot) instead of a list, and both global generators read from
    memory where :mod:`telepathy.rng_peek` can: then the two keys are the peeker's own tensors, overwritten by
    the next packed capture (a snapshot copies them at once; anyone else copies them before asking again)."""
    peek = rng_peek.peeker() if packed else None
    if peek is not None:  # the same values, read from memory (a tenth of a per-step snapshot's cost)
        version, python_key, gauss_next = peek.python()
        python_internal: Any = PackedInts(python_key)
        numpy_state = peek.numpy()
    else:
        version, internal, gauss_next = random.getstate()
        python_internal = _packed(internal) if packed else list(internal)
        numpy_state = _numpy_capture()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": python_internal, "gauss_next": gauss_next},
        "numpy": numpy_state,
        "torch_cpu": torch.get_rng_state(),
        "cuda": [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_initialized() and torch.cuda.is_available():  # (is_available is the slower: 4% of a snapshot)
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _numpy_capture() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "bit_generator": np_state["bit_generator"],
        "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "pos": int(np_state["state"]["pos"]),
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }


def _packed(internal: tuple[int, ...]) -> PackedInts:
    """The packing of Python's state, made again only when the state changed (ints only: equal is identical;
    the tensor is never written to, only copied)."""
    global _packed_python
    last = _packed_python
    if last is not None and last[0] == internal:
        return last[1]
    packing = PackedInts(torch.frombuffer(array.array("q", internal), dtype=torch.int64))
    _packed_python = (internal, packing)
    return packing


def check_rng_state(state: Any, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Raise (ValueError, TypeError, ...) if :func:`restore_rng_state` would fail part-way: every state is set on a
    fresh generator of its kind, so a checkpoint whose RNG state cannot be restored is refused before anything of
    the run (weights, optimizer, the global generators) has been touched."""
    if not isinstance(state, Mapping):
        raise TypeError(f"the RNG state is a {type(state).__name__}, not a mapping")
    random.Random().setstate(_python_state(state["python"]))
    np.random.RandomState().set_state(_numpy_state(state["numpy"]))
    torch.Generator().set_state(_tensor(state["torch_cpu"], "torch_cpu"))
    _check_cuda(state.get("cuda") or [])
    saved_generators = _saved_generators(state, generators)
    for name, gen in (generators or {}).items():  # a fresh generator on the registered one's device (CUDA: 16 bytes)
        torch.Generator(device=gen.device).set_state(_tensor(saved_generators[name], f"generators.{name}"))


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put every generator back exactly as ``capture_rng_state`` saw it.

    Raises ValueError when a registered generator is missing from the checkpoint, or when the checkpoint
    holds CUDA states for more devices than this process can see (:func:`check_rng_state` finds both first).
    """
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("cuda") or []
    _check_cuda(cuda_states)
    if cuda_states:
        torch.cuda.set_rng_state_all(list(cuda_states))
    saved_generators = _saved_generators(state, generators)
    for name, gen in (generators or {}).items():
        gen.set_state(saved_generators[name])


def _python_state(py: Mapping[str, Any]) -> tuple:
    return (int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"])


def _numpy_state(npy: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "bit_generator": npy["bit_generator"],
        "state": {"key": _tensor(npy["key"], "numpy.key").numpy().astype(np.uint32), "pos": int(npy["pos"])},
        "has_gauss": int(npy["has_gauss"]),
        "gauss": float(npy["gauss"]),
    }


def _tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"RNG state {name} is a {type(value).__name__}, not a tensor")
    return value


def _saved_generators(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None) -> Mapping:
    saved = state.get("generators", {})
    for name in generators or {}:
        if not isinstance(saved, Mapping) or name not in saved:
            raise ValueError(
                f"generator {name!r} is registered in this run but absent from the checkpoint "
                f"(checkpoint has: {sorted(saved) if isinstance(saved, Mapping) else []}); register the same "
                "generators as the run that saved it"
            )
    return saved


def _check_cuda(cuda_states: Sequence[torch.Tensor]) -> None:
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"checkpoint holds CUDA RNG state for {len(cuda_states)} device(s) but CUDA is not available; "
            "resume on a machine with the same GPUs to continue bit-identically"
        )
    if len(cuda_states) > torch.cuda.device_count():
        raise ValueError(
            f"checkpoint holds CUDA RNG state for {len(cuda_states)} devices, this process sees "
            f"{torch.cuda.device_count()}; resume with the same visible devices"
        )
    for i, cuda_state in enumerate(cuda_states):
        _tensor(cuda_state, f"cuda[{i}]")


def rng_states_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Exact comparison of two captured states (used by tests and tools)."""
    return _equal(a, b)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b
