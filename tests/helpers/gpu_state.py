"""In-process checks of the device copies behind async saves and per-step snapshots, on any device: each committed
or snapshotted tensor must equal a copy of the same tensor taken at the same step, although the next steps' kernels
are already modifying the parameters on the device. The reference copies are device-side clones queued in stream
order (no host synchronisation), so the check never waits for the GPU on the copy's behalf."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from telepathy import Checkpointer, TrainState
from telepathy.disk import slots
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.store.snapshot_read import files_from_slot
from telepathy.store.step_snapshots import StepSnapshots

WIDTH = 1024  # one layer: 4 MiB of fp32 weights, 12 MiB with its AdamW moments


def busy_model(device: str, mib: int) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """About ``mib`` MiB of weights and a step that launches its kernels without waiting for them."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(max(1, mib // 4))]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(512, WIDTH, device=device)

    def step() -> None:  # no .item(): on a GPU the host returns while the kernels still run
        loss = model(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, optimizer, step


def clones(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the state, cloned on its device (ordered after this step's kernels, before the next's)."""
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, per_param in optimizer.state_dict()["state"].items():
        out.update({f"optimizer/{index}/{k}": v.clone() for k, v in per_param.items() if torch.is_tensor(v)})
    return out


def flatten(model_part: dict, optimizer_part: dict) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in model_part.items()}
    for index, per_param in optimizer_part["optimizer"]["state"].items():
        out.update({f"optimizer/{index}/{k}": v for k, v in per_param.items() if torch.is_tensor(v)})
    return out


def differences(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], step: int) -> list[str]:
    if got.keys() != expected.keys():
        return [f"step {step}: tensors {sorted(got.keys() ^ expected.keys())[:4]} differ"]
    return [f"step {step}: {k}" for k, v in expected.items() if not torch.equal(got[k].cpu(), v.cpu())]


def async_saves_match(save_dir: Path, device: str, steps: int = 6, mib: int = 64) -> tuple[list[str], dict]:
    """``save(blocking=False)`` at every step, the next step launched as soon as it returns (its background write
    then runs while the parameters change on the device). Returns (differences, the host buffers by state path, so
    that a caller can check that they are pinned); reallocated buffers between saves count as a difference."""
    model, optimizer, step = busy_model(device, mib)
    expected, pointers = {}, []
    with Checkpointer(save_dir, parts={"model": model}, optimizer=optimizer, async_save=True, interval=None,
                      keep_last=steps + 1) as ckpt:  # fmt: skip
        for n in range(1, steps + 1):
            step()
            ckpt.save(TrainState(global_step=n), "interval", blocking=False)  # returns once staged on the host
            expected[n] = clones(model, optimizer)
            pointers.append(sorted(b.data_ptr() for b in ckpt._buffers._buffers.values()))
        ckpt.wait()
        buffers = dict(ckpt._buffers._buffers)
    found = []
    committed = {ref.step: ref.path for ref in CheckpointStore(save_dir).committed()}
    if sorted(committed) != list(range(1, steps + 1)):
        found.append(f"committed steps {sorted(committed)}, expected 1..{steps}")
    for n, path in committed.items():
        got = flatten(CheckpointStore.load_part(path, "model"), CheckpointStore.load_part(path, "optimizer"))
        found += differences(got, expected[n], n)
    if any(p != pointers[0] for p in pointers):  # one set of host buffers, allocated at the first save
        found.append("the host buffers were reallocated between saves")
    return found, buffers


def step_snapshots_match(save_dir: Path, slot_dir: Path, device: str, steps: int = 6, mib: int = 64) -> list[str]:
    """A per-step snapshot into shared-memory slots at every step; the slot is read back on the host while the
    next step's kernels run, and must be complete (its completion mark written only after every device-to-host
    copy landed) and equal to the clones of that step."""
    model, optimizer, step = busy_model(device, mib)
    found, pending = [], None
    with Checkpointer(save_dir, parts={"model": model}, optimizer=optimizer, interval=None) as ckpt:
        snapshots = StepSnapshots(slot_dir)
        options = dataclasses.asdict(ckpt.options)
        try:
            for n in range(1, steps + 2):
                step()  # step n's kernels are queued; the slot still holds step n-1
                if pending is not None:
                    found += read_back(slot_dir, *pending)
                if n > steps:
                    break
                state = TrainState(global_step=n)
                pending = (n, clones(model, optimizer))
                snapshots.capture(n, ckpt._files(state), ckpt._info(state, "rescue", None), options)
        finally:
            snapshots.close()
    return found


def read_back(slot_dir: Path, n: int, expected: dict[str, torch.Tensor]) -> list[str]:
    newest = slots.read_newest(slot_dir)
    if newest is None or newest[0]["step"] != n:
        return [f"step {n}: the newest complete slot is {None if newest is None else newest[0]['step']}"]
    files = files_from_slot(*newest)
    return differences(flatten(files["model"], files["optimizer"]), expected, n)
