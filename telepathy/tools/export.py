"""``python -m telepathy export SAVE_DIR``: the trained parts of a checkpoint as safetensors files, for use
outside this library (transformers, inference servers): ``<part>.safetensors`` per model part; the optimizer,
training state and per-rank files are not exported. safetensors is a format that cannot carry code."""

from __future__ import annotations

from pathlib import Path

import torch

from telepathy.disk.catalog import verify_checkpoint
from telepathy.disk.contents import model_parts
from telepathy.store.formats import load_part


def export_checkpoint(checkpoint: Path, out: Path) -> list[Path]:
    """Write each part of a verified checkpoint to ``out/<part>.safetensors``; refuse to overwrite."""
    from safetensors.torch import save_file  # noqa: PLC0415 (optional dependency)

    manifest = verify_checkpoint(checkpoint)
    if manifest.get("sharded"):
        raise ValueError(f"{checkpoint} holds sharded (DCP) state; export supports replicated checkpoints only — "
                         "load it in a run with sharded=True and save the full state dict instead")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for part in model_parts(manifest["files"]):
        target = out / f"{part}.safetensors"
        if target.exists():
            raise FileExistsError(f"{target} exists; choose another --out (nothing was overwritten)")
        state = load_part(checkpoint, part)
        if not isinstance(state, dict):
            raise ValueError(f"{checkpoint}/{part}.pt does not hold a state dict; nothing to export")
        stored = (checkpoint / f"{part}.pt").stat().st_size + sum(
            b["bytes"] for b in (manifest.get("blobs") or {}).values()
        )
        wanted = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        if wanted > 2 * stored + (64 << 20):  # views of one storage would each be written out in full
            raise ValueError(
                f"{checkpoint}/{part}.pt would expand from {stored / 2**20:.1f} MiB stored to "
                f"{wanted / 2**20:.1f} MiB of tensors (many views of the same storage?); refusing it"
            )
        tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        skipped = sorted(set(state) - set(tensors))
        meta = {"telepathy_checkpoint": str(checkpoint), "step": str(manifest.get("step"))}
        if skipped:
            meta["skipped_non_tensors"] = ",".join(skipped)[:1000]
        save_file(tensors, str(target), metadata=meta)
        written.append(target)
    return written
