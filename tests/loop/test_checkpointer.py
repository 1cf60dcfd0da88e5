"""The loop helper: save/resume of parts, optimizer, scheduler, scaler, generators; refusals; emergency."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch
from torch import nn

from telepathy import training_signals
from telepathy.checkpointer import Checkpointer
from telepathy.train_state import ResumeMismatchError, TrainState


def make(save_dir, seed=0, signature=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(123)
    ckpt = Checkpointer(
        save_dir,
        parts={"encoder": model},
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        generators={"aug": gen},
        signature=signature or {"batch_size": 4, "world_size": 1},
    )
    return ckpt, model, opt, sched, gen


def train_steps(model, opt, sched, gen, state, n):
    losses = []
    for _ in range(n):
        x = torch.randn(4, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        state.advance(batches_per_epoch=3)
        losses.append(loss.item())
    return losses


def test_resume_continues_exactly(tmp_path):
    ckpt, model, opt, sched, gen = make(tmp_path)
    state = ckpt.resume()
    assert state == TrainState()
    train_steps(model, opt, sched, gen, state, 4)
    ckpt.save(state, "interval")
    expected = train_steps(model, opt, sched, gen, state, 3)
    expected_params = [p.detach().clone() for p in model.parameters()]

    ckpt2, model2, opt2, sched2, gen2 = make(tmp_path, seed=99)  # different init: everything must come from disk
    state2 = ckpt2.resume()
    assert (state2.epoch, state2.batch_idx, state2.global_step) == (1, 1, 4)
    assert sched2.last_epoch == 4 and opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert ckpt2.scaler.get_scale() == 1024.0
    assert train_steps(model2, opt2, sched2, gen2, state2, 3) == expected
    assert all(torch.equal(a, b) for a, b in zip(expected_params, model2.parameters()))


def test_signature_mismatch_refuses_before_loading(tmp_path):
    ckpt, model, *_ = make(tmp_path)
    ckpt.save(TrainState(global_step=1), "interval")
    ckpt2, model2, *_ = make(tmp_path, seed=5, signature={"batch_size": 8, "world_size": 1})
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(ResumeMismatchError, match="batch_size: checkpoint has 4, this run has 8"):
        ckpt2.resume()
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters())), "nothing loaded on refusal"


def test_shape_mismatch_names_the_part(tmp_path):
    ckpt, *_ = make(tmp_path)
    ckpt.save(TrainState(global_step=1), "interval")
    ckpt2, model2, *_ = make(tmp_path)
    model2[0] = nn.Linear(4, 16)
    model2[2] = nn.Linear(16, 2)
    with pytest.raises(ResumeMismatchError) as err:
        ckpt2.resume()
    assert "part 'encoder'" in str(
        err.value
    ) and "0.weight: checkpoint has shape (8, 4), this model has (16, 4)" in str(err.value)
    other = Checkpointer(tmp_path, parts={"encoder": nn.Linear(3, 3)}, signature={"batch_size": 4, "world_size": 1})
    with pytest.raises(ResumeMismatchError, match="not in this model: 0.weight"):
        other.resume()


def test_reserved_part_names():
    with pytest.raises(ValueError, match="reserved"):
        Checkpointer("/nonexistent", parts={"state": nn.Linear(1, 1)})


def test_emergency_guard_saves_and_reraises(tmp_path, caplog):
    ckpt, model, opt, sched, gen = make(tmp_path)
    state = ckpt.resume()
    train_steps(model, opt, sched, gen, state, 2)
    ckpt.save(state, "interval")
    with caplog.at_level(logging.ERROR, logger="telepathy"), pytest.raises(ZeroDivisionError):
        with ckpt.emergency_guard(state):
            train_steps(model, opt, sched, gen, state, 1)
            raise ZeroDivisionError("boom")
    emergency = list((tmp_path / "emergency").iterdir())
    assert len(emergency) == 1 and "emergency checkpoint saved to" in caplog.text and "resume_from" in caplog.text
    ckpt2, *_ = make(tmp_path)
    assert ckpt2.resume().global_step == 2, "automatic resume ignores the emergency checkpoint"
    assert ckpt2.resume(resume_from=emergency[0]).global_step == 3, "by hand it resumes"


def test_step_boundary_saves_on_signal_and_reports_exit(tmp_path):
    ckpt, *_ = make(tmp_path)
    training_signals.install_signal_handlers()
    state = TrainState(global_step=3)
    assert not ckpt.step_boundary(state, interval=300)
    assert not ckpt.store.committed()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert ckpt.step_boundary(state, interval=300)
    manifest_reason = ckpt.store.newest_valid()[1]["reason"]
    assert manifest_reason == "signal:SIGTERM" and training_signals.exit_code() == 99


def test_two_emergency_checkpoints_in_one_second_both_land(tmp_path):
    model = nn.Linear(2, 2)
    with Checkpointer(tmp_path, parts={"model": model}) as ckpt:
        first = ckpt.save_emergency(TrainState(global_step=5), RuntimeError("one"))
        second = ckpt.save_emergency(TrainState(global_step=5), RuntimeError("two"))
    assert first is not None and second is not None and first != second
    assert sorted(p.name for p in (tmp_path / "emergency").iterdir()) == sorted([first.name, second.name])
