"""The LatentWire trainer with ``--device cuda``: SIGTERM, resume, and the run equals an uninterrupted one on the GPU
(every step's loss, the encoder, the adapter and the optimizer); its checkpoints hold the CUDA RNG states and refuse
a resume on another kind of device. Skipped without a GPU."""

from __future__ import annotations

import signal
import sys

import pytest
import torch
from gpu_runs import requires_cuda
from harness import Interrupt, RunResult, run_once

from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = [pytest.mark.cuda, requires_cuda]
TRAINER = [sys.executable, "-m", "telepathy.latentwire.train"]


def args_for(save_dir, *extra):
    return ["--save_dir", str(save_dir), "--samples", "32", "--batch_size", "8", "--epochs", "2", "--log_every",
            "1", "--checkpoint_interval", "1000", "--step_delay", "0.05", "--auto_resume", "--device", "cuda",
            *extra]  # fmt: skip


def test_latentwire_on_cuda_resumes_bit_identically(tmp_path):
    reference, interrupted = RunResult(), RunResult()
    assert run_once(args_for(tmp_path / "ref"), [], reference, trainer=TRAINER, timeout=300) == 0, reference.outputs
    assert sorted(reference.losses) == list(range(1, 9))
    assert run_once(args_for(tmp_path / "run"), [Interrupt(3, signal.SIGTERM)], interrupted, trainer=TRAINER,
                    timeout=300) == 99, interrupted.outputs[-1][-3000:]  # fmt: skip
    assert run_once(args_for(tmp_path / "run"), [], interrupted, trainer=TRAINER, timeout=300) == 0
    assert interrupted.replay_mismatches == [] and interrupted.losses == reference.losses
    final = {d: CheckpointStore(tmp_path / d).newest_valid()[0].path for d in ("ref", "run")}
    for part in ("encoder", "adapter_llama", "optimizer"):
        a, b = (CheckpointStore.load_part(final[d], part) for d in ("ref", "run"))
        assert str(a) == str(b) and all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b))), part
    state = CheckpointStore.load_part(final["run"], "state")
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count() and state["signature"]["device"] == "cuda"
    on_cpu = RunResult()  # the same save dir resumed on the CPU: refused (exit 3), not continued inexactly
    code = run_once(args_for(tmp_path / "run", "--device", "cpu"), [], on_cpu, trainer=TRAINER, timeout=300)
    assert code == 3 and "device" in on_cpu.outputs[-1], on_cpu.outputs[-1][-2000:]


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)
