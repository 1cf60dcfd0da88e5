"""Sharded state (FSDP2 / DTensor) through ``torch.distributed.checkpoint`` (DCP), read without unpickling code.

DCP is the format: every rank writes its own shards (``__<rank>_<n>.distcp``) into the checkpoint's temporary
directory, the coordinator writes the global metadata, and loading reshards to whatever world size and
sharding the resuming run has. Two guards are added on the way in, because DCP reads its metadata with plain
``pickle`` and its non-tensor items with ``torch.load(weights_only=False)``: the metadata is unpickled by an
allow-list (DCP's own metadata dataclasses, torch sizes/dtypes/layouts, paths), the items with
``weights_only=True``. The metadata file is renamed to ``sharded.metadata`` so that it has a plain name in
the manifest like every other file.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

from telepathy.disk.contents import SHARD_METADATA, shard_pattern
from telepathy.errors import UnsafeCheckpointError

METADATA_NAME = SHARD_METADATA
_DCP_METADATA = ".metadata"
_SAFE_MODULE = "torch.distributed.checkpoint.metadata"  # DCP's metadata dataclasses and enums
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


def save(state_dict: dict[str, Any], directory: Path, rank: int) -> list[Path]:
    """Collective: write this rank's shards of ``state_dict`` (fsynced) into ``directory``; return the files
    this rank wrote (rank 0 also owns the metadata)."""
    dcp.save(state_dict, storage_writer=FileSystemWriter(directory, sync_files=True))
    if rank == 0:
        os.rename(directory / _DCP_METADATA, directory / METADATA_NAME)
    files = sorted(directory.glob(shard_pattern(rank)))
    return files + ([directory / METADATA_NAME] if rank == 0 else [])


def load(state_dict: dict[str, Any], directory: Path) -> None:
    """Collective: fill ``state_dict`` (this run's sharded tensors, any world size) in place from ``directory``."""
    try:
        read_metadata(directory)  # refused here with a clear error, before DCP wraps it in its own
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{directory / METADATA_NAME} is not a safe checkpoint file: {exc}; "
                                    "refusing to load it") from None  # fmt: skip
    dcp.load(state_dict, storage_reader=_SafeReader(directory), planner=_SafeLoadPlanner())


def save_parts(parts: Mapping[str, nn.Module], optimizer: Optimizer | None, directory: Path, rank: int) -> list[Path]:
    """Collective: the parts' and optimizer's (FQN-keyed, sharded) state through DCP into ``directory``."""
    return save(_state_of(parts, optimizer), directory, rank)


def load_parts(parts: Mapping[str, nn.Module], optimizer: Optimizer | None, directory: Path) -> None:
    """Collective: load into this run's layout; DCP reshards the saved tensors into it (any world size)."""
    state = _state_of(parts, optimizer)
    load(state, directory)
    set_state_dict(nn.ModuleDict(parts), optimizer or [], model_state_dict=state["parts"],
                   optim_state_dict=state["optimizer"])  # fmt: skip


def _state_of(parts: Mapping[str, nn.Module], optimizer: Optimizer | None) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(nn.ModuleDict(parts), optimizer or [])
    return {"parts": model_state, "optimizer": optimizer_state}


class _RestrictedUnpickler(pickle.Unpickler):
    """Only the classes defined in DCP's metadata module, torch sizes/dtypes/layouts and a few builtins; no functions
    (other than torch's layout lookup), so unpickling can construct data but never run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        if module == _SAFE_MODULE or (module, name) in _SAFE_GLOBALS:
            value = getattr(__import__(module, fromlist=[name]), name, None)
            if (module, name) in _SAFE_GLOBALS or (isinstance(value, type) and value.__module__ == module):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in sharded checkpoint metadata")


def read_metadata(directory: Path) -> Metadata:
    """The DCP metadata of a checkpoint, unpickled through the allow-list (UnpicklingError otherwise)."""
    with open(Path(directory) / METADATA_NAME, "rb") as f:
        metadata = _RestrictedUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{METADATA_NAME} does not hold DCP metadata")
    return metadata


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # DCP's own planner uses weights_only=False here
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
