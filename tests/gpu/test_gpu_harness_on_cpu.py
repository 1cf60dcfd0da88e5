"""Harness self-checks: the code behind the ``cuda`` tests, run on the CPU so that it is proven on every machine. The
same worker, schedules and comparisons as on a GPU must pass here, and must fail when a part of the resume is broken
on purpose (the RNGs, the GradScaler, the host copy of an async save, the per-step snapshot's copy)."""

from __future__ import annotations

import subprocess
import sys
import time

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
    scales,
)
from gpu_state import async_saves_match, step_snapshots_match
from harness import Interrupt

from telepathy.latentwire import config
from telepathy.store import step_snapshots
from telepathy.store.checkpoint_store import CheckpointStore
from telepathy.store.snapshot import HostBuffers


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return reference(tmp_path_factory.mktemp("fp32"), "cpu")


@pytest.mark.slow
def test_worker_resumes_bit_identically_on_cpu(tmp_path, fp32):
    schedule = [[Interrupt(5, USR1), Interrupt(9, TERM)], [Interrupt(20, USR1, then_kill_after=0.12)]]
    _, found = mismatches(tmp_path, schedule, fp32, "cpu", env=SAVE_PAUSE)
    assert found == [], "\n".join(found[:20])


@pytest.mark.slow
def test_a_resume_without_the_rngs_is_caught(tmp_path, fp32):
    _, found = mismatches(tmp_path, [[Interrupt(10, TERM)]], fp32, "cpu", "--negative_control", "rng")
    assert any(f.startswith("step 11:") for f in found), found[:5]  # the first step after the resume


@pytest.mark.slow
def test_gradscaler_scale_and_growth_are_compared_at_every_step(tmp_path):
    """fp16 autocast with a GradScaler on the CPU: the scale changes during the run, a resume keeps it, and a resume
    that drops the scaler's state is caught at the first step after it."""
    ref = reference(tmp_path / "ref", "cpu", "--amp", "fp16")
    assert len(set(scales(ref[0]))) >= 3, scales(ref[0])
    schedule = [[Interrupt(8, TERM)], [Interrupt(22, KILL)]]
    _, found = mismatches(tmp_path / "good", schedule, ref, "cpu", "--amp", "fp16")
    assert found == [], "\n".join(found[:20])
    _, found = mismatches(tmp_path / "bad", schedule[:1], ref, "cpu", "--amp", "fp16", "--negative_control", "scaler")
    assert any(f.startswith("step 9:") and "scale=" in f for f in found), found[:5]


@pytest.mark.slow
def test_one_rank_process_group_gives_the_same_run(tmp_path, fp32):
    """The NCCL test's path (DDP, agreement and commit through the collective path) at world size 1, with gloo."""
    env = one_rank_env()
    _, found = mismatches(tmp_path, [[Interrupt(10, TERM)]], fp32, "cpu", "--backend", "gloo", env=env)
    assert found == [], "\n".join(found[:20])


@pytest.mark.slow
def test_per_step_protection_on_cpu(tmp_path, fp32):
    check_per_step_protection(tmp_path, "cpu", fp32)


@pytest.mark.slow
def test_async_save_copies_are_compared_with_the_step(tmp_path, monkeypatch):
    """The async-save check passes as it is, and fails when the snapshot hands out the live tensors (no host copy)
    while the writer waits long enough for the next step to change them."""
    found, buffers = async_saves_match(tmp_path / "good", "cpu", steps=3, mib=4)
    assert found == [] and buffers, found
    monkeypatch.setattr(HostBuffers, "_copy_tensor", lambda self, tensor, key, devices: tensor)
    real_save = CheckpointStore.save

    def late_save(self, *args, **kwargs):  # the writer starts after the loop ran the next step
        time.sleep(0.3)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "save", late_save)
    found, _ = async_saves_match(tmp_path / "bad", "cpu", steps=3, mib=4)
    assert any(f.startswith("step 1: model/") for f in found), found[:5]


@pytest.mark.slow
def test_step_snapshot_copies_are_compared_with_the_step(tmp_path, monkeypatch):
    """The per-step snapshot check passes as it is, and fails when the copy into the slot is left incomplete before
    its completion mark (here: the second half of the tensors not copied)."""
    for name in ("slots-good", "slots-bad"):
        (tmp_path / name).mkdir()
    assert step_snapshots_match(tmp_path / "good", tmp_path / "slots-good", "cpu", steps=3, mib=4) == []
    real = torch._foreach_copy_
    monkeypatch.setattr(step_snapshots.torch, "_foreach_copy_", lambda dst, src, **kw: real(dst[::2], src[::2], **kw))
    found = step_snapshots_match(tmp_path / "bad", tmp_path / "slots-bad", "cpu", steps=3, mib=4)
    assert len(found) >= 3, found


def test_latentwire_device_flag_defaults_to_cpu_and_refuses_junk(capsys):
    assert config.parse([]).device == "cpu"
    assert config.parse(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit) as err:
        config.parse(["--device", "tpu"])
    assert err.value.code == 2 and "expected cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_latentwire_on_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "telepathy.latentwire.train", "--save_dir", str(tmp_path / "x"),
                           "--device", "cuda"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--device cuda: no such CUDA device is visible" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
