"""Snapshots of training state into reusable host buffers, for saving in the background.

An async save may only block the loop for as long as it takes to copy the state somewhere the loop will not
touch; serialising, hashing, writing and fsyncing then run in a background thread while training mutates the
originals. The buffers are allocated at the first save and reused afterwards (one host copy of the state, no
allocation per save). CUDA tensors go to pinned buffers with non-blocking copies and one synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch

from telepathy import tree


class HostBuffers:
    """Reusable CPU buffers keyed by a tensor's position in the state; :meth:`snapshot` returns a copy of the
    state whose tensors live in them (valid until the next snapshot)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def snapshot(self, state: Any) -> Any:
        devices: set[torch.device] = set()

        def leaf(value: Any, path: str) -> Any:
            return self._copy_tensor(value, path, devices) if isinstance(value, torch.Tensor) else tree.KEEP

        copy = tree.transform(state, leaf, strict=True)  # numbers, strings, None: immutable, kept as they are
        for device in devices:  # every device's non-blocking device-to-host copies must land before writing
            torch.cuda.synchronize(device)
        return copy

    def _copy_tensor(self, tensor: torch.Tensor, key: str, devices: set[torch.device]) -> torch.Tensor:
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.is_cuda and torch.cuda.is_available()
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buffer
        if tensor.is_cuda:
            devices.add(tensor.device)
            buffer.copy_(tensor, non_blocking=True)
        else:
            buffer.copy_(tensor)
        return buffer
