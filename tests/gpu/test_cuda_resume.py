"""Bit-identical resume on a GPU, through real processes and real signals: a small model trained on CUDA with dropout,
device-side noise from the global CUDA generator and from a registered CUDA ``torch.Generator``,
``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. Every step's loss (replayed steps
too) and the final weights, optimizer, scheduler, GradScaler and RNG states (CUDA included) must equal an
uninterrupted run's. Skipped without a GPU; ``test_gpu_harness_on_cpu.py`` runs the same code on the CPU."""

from __future__ import annotations

import pytest
import torch
from gpu_runs import (
    KILL,
    SAVE_PAUSE,
    TERM,
    USR1,
    check_per_step_protection,
    mismatches,
    one_rank_env,
    reference,
    requires_cuda,
    scales,
)
from harness import Interrupt, final_checkpoint, load_checkpoint_files

pytestmark = [pytest.mark.cuda, requires_cuda]

SCHEDULES = {
    "sigterm_twice": [[Interrupt(7, TERM)], [Interrupt(20, TERM)]],
    "sigusr1_then_sigkill_replays": [[Interrupt(5, USR1), Interrupt(20, KILL)]],
    "sigkill_during_a_save": [[Interrupt(9, USR1, then_kill_after=0.12)], [Interrupt(24, KILL)]],
}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return reference(tmp_path_factory.mktemp("fp32"), "cuda")


def test_the_reference_saved_every_cuda_generator(fp32):
    """A resume can only be exact if the checkpoint holds the CUDA states: the global one of every device and the
    registered CUDA generator (16 bytes: seed and Philox offset)."""
    rng = fp32[1]["state"]["rng"]
    assert len(rng["cuda"]) == torch.cuda.device_count()
    assert rng["generators"]["noise"].numel() == 16


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_signals_resume_bit_identically_on_cuda(name, tmp_path, fp32):
    result, found = mismatches(tmp_path, SCHEDULES[name], fp32, "cuda", env=SAVE_PAUSE)
    assert found == [], f"{name}: exit codes {result.exit_codes}; differs:\n" + "\n".join(found[:20])


def test_without_the_cuda_rng_states_the_resume_differs(tmp_path, fp32):
    """Negative control: the same SIGTERM schedule, the CUDA states not put back. Dropout and noise on the GPU then
    draw other numbers, and the comparison must see it (else the tests above prove nothing about CUDA)."""
    _, found = mismatches(tmp_path, [[Interrupt(10, TERM)]], fp32, "cuda", "--negative_control", "cuda_rng")
    assert found, "a resume without the CUDA RNG states was reported bit-identical"


def test_async_saves_every_step_resume_bit_identically_on_cuda(tmp_path, fp32):
    """``--save_every_steps 1 --async_save``: each save stages the CUDA tensors in pinned host buffers and commits in
    the background while the next steps run; signals and a SIGKILL (the whole process) still resume exactly."""
    schedule = [[Interrupt(6, USR1), Interrupt(15, TERM)], [Interrupt(27, KILL)]]
    _, found = mismatches(tmp_path, schedule, fp32, "cuda", "--save_every_steps", "1", "--async_save")
    assert found == [], "\n".join(found[:20])


def test_per_step_protection_on_cuda(tmp_path, fp32):
    """``--snapshot_every_step`` under the supervisor: the trainer SIGKILLed three times loses at most the step in
    flight each time (its CUDA state copied to shared memory at every step) and finishes bit-identical."""
    check_per_step_protection(tmp_path, "cuda", fp32)


def test_pinned_dataloader_with_workers_gives_the_same_run(tmp_path, fp32):
    """``pin_memory=True``, two workers and non-blocking uploads change neither the samples nor their order: the run,
    interrupted by SIGTERM and SIGKILL, equals the plain reference bit for bit."""
    schedule = [[Interrupt(8, TERM)], [Interrupt(21, KILL)]]
    _, found = mismatches(tmp_path, schedule, fp32, "cuda", "--num_workers", "2", "--pin_memory")
    assert found == [], "\n".join(found[:20])


def test_bf16_autocast_resumes_bit_identically(tmp_path):
    ref = reference(tmp_path / "ref", "cuda", "--amp", "bf16")
    _, found = mismatches(tmp_path / "run", [[Interrupt(10, TERM)], [Interrupt(25, KILL)]], ref, "cuda",
                          "--amp", "bf16")  # fmt: skip
    assert found == [], "\n".join(found[:20])


def test_fp16_gradscaler_resumes_with_its_scale_and_growth_tracker(tmp_path):
    """fp16 autocast with a GradScaler whose scale backs off (overflow) and grows again (growth interval 3) during
    the run: every step's loss token carries the scale and growth tracker, so they are compared at every step."""
    ref = reference(tmp_path / "ref", "cuda", "--amp", "fp16")
    assert len(set(scales(ref[0]))) >= 3, f"the scale hardly changed, the test proves little: {scales(ref[0])}"
    _, found = mismatches(tmp_path / "run", [[Interrupt(8, TERM)], [Interrupt(22, KILL)]], ref, "cuda",
                          "--amp", "fp16")  # fmt: skip
    assert found == [], "\n".join(found[:20])
    scaler = load_checkpoint_files(final_checkpoint(tmp_path / "run"))["optimizer"]["scaler"]
    assert scaler == ref[1]["optimizer"]["scaler"] and set(scaler) >= {"scale", "_growth_tracker"}


def test_nccl_at_world_size_1_resumes_bit_identically(tmp_path, fp32):
    """One rank of an NCCL process group (DDP, agreement and commit through the collective path). Two ranks on one
    GPU cannot use NCCL, so this is world size 1; the run must still equal the plain reference."""
    env = one_rank_env()
    _, found = mismatches(tmp_path, [[Interrupt(10, TERM)]], fp32, "cuda", "--backend", "nccl", env=env)
    assert found == [], "\n".join(found[:20])
