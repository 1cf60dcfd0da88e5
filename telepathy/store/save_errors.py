"""Why a save failed, in words an operator can act on: the OSError behind a library's wrapper, the space the
checkpoint needs against what the filesystem has, and whether the previous checkpoint still stands."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from telepathy import tree


def describe_failure(save_dir: Path, step: int, error: OSError, files: Mapping[str, Any], previous: Path | None) -> str:
    try:
        free = f"{shutil.disk_usage(save_dir).free / 2**20:.1f} MiB"
    except OSError:
        free = "an unknown amount"
    return (
        f"could not write the checkpoint for step {step} in {save_dir}: {error.strerror or error} "
        f"({errno.errorcode.get(error.errno or 0, 'no errno')}); it needs about "
        f"{tensor_bytes(files) / 2**20:.1f} MiB and the filesystem has {free} free; "
        + (f"the previous checkpoint {previous} is intact and still latest" if previous else "nothing was saved")
    )


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested structure (what a checkpoint of it needs, give or take metadata)."""
    return sum(v.numel() * v.element_size() for v in tree.leaves(obj) if isinstance(v, torch.Tensor))


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one it was raised from or during (``torch.save`` turns a full
    disk into a RuntimeError from its zip writer, with the OSError as its context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
