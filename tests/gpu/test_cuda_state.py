"""The CUDA code paths of the state itself, in one process: CUDA RNG capture and restore (the global generators and
a registered CUDA ``torch.Generator``), pinned staging of async saves that are never torn while the next steps
modify the parameters on the GPU, and per-step shared-memory snapshots whose completion mark follows every
device-to-host copy. Skipped without a GPU; ``test_gpu_harness_on_cpu.py`` runs the same checks on the CPU."""

from __future__ import annotations

import pytest
import torch
from gpu_runs import requires_cuda
from gpu_state import async_saves_match, step_snapshots_match
from torch import nn

from telepathy import Checkpointer, TrainState
from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = [pytest.mark.cuda, requires_cuda]


def test_cuda_rng_states_round_trip_through_a_checkpoint(tmp_path):
    """After a resume, the global CUDA generator and a registered CUDA generator draw exactly what they drew after
    the save. (Before this test, a registered CUDA generator's 16-byte state was checked on a CPU generator, which
    refused it, so every checkpoint of such a run was skipped as unusable.)"""
    gen = torch.Generator(device="cuda").manual_seed(7)
    torch.cuda.manual_seed_all(3)
    with Checkpointer(tmp_path, parts={"model": nn.Linear(4, 4).cuda()}, generators={"g": gen}) as ckpt:
        torch.randn(100, device="cuda")
        torch.randn(100, device="cuda", generator=gen)
        ckpt.save(TrainState(global_step=1), "test")
    expected = torch.rand(1000, device="cuda"), torch.rand(1000, device="cuda", generator=gen)
    torch.cuda.manual_seed_all(99)
    gen.manual_seed(99)
    with Checkpointer(tmp_path, parts={"model": nn.Linear(4, 4).cuda()}, generators={"g": gen}) as ckpt:
        assert ckpt.resume().global_step == 1
    got = torch.rand(1000, device="cuda"), torch.rand(1000, device="cuda", generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    saved = CheckpointStore.load_part(CheckpointStore(tmp_path).committed()[-1].path, "state")["rng"]
    assert len(saved["cuda"]) == torch.cuda.device_count() and saved["generators"]["g"].numel() == 16


def test_async_snapshots_are_never_torn_on_cuda(tmp_path):
    """Six async saves of a 64 MiB model and its AdamW moments (192 MiB), each followed at once by the next step on
    the GPU: every committed tensor equals the clone taken at its step; CUDA tensors were staged in pinned host
    buffers, allocated once and reused."""
    found, buffers = async_saves_match(tmp_path, "cuda", steps=6, mib=64)
    assert found == [], "\n".join(found[:20])
    staged = {k: b for k, b in buffers.items() if k.startswith("/model/") or k.endswith(("exp_avg", "exp_avg_sq"))}
    assert staged and all(b.is_pinned() for b in staged.values()), [k for k, b in staged.items() if not b.is_pinned()]


def test_step_snapshots_are_complete_when_marked_on_cuda(tmp_path):
    """``_foreach_copy_`` from CUDA tensors into the shared-memory views must have landed before the slot's
    completion mark: each slot, read back while the next step's kernels run, equals the clones of its step."""
    (tmp_path / "slots").mkdir()
    found = step_snapshots_match(tmp_path / "save", tmp_path / "slots", "cuda", steps=6, mib=64)
    assert found == [], "\n".join(found[:20])
