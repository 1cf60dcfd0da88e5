"""The tensor dtypes whose raw bytes telepathy writes outside ``torch.save`` (blobs, step snapshots), by name.

A name read back from a file is looked up here, never evaluated: an unknown one is refused."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    str(d): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
}  # fmt: skip
