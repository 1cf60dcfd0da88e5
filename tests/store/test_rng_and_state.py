"""RNG capture/restore and the training-state record."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from telepathy import rng
from telepathy.train_state import (
    ResumeMismatchError,
    TrainState,
    check_signature,
    run_metadata,
    state_from_dict,
    state_to_dict,
)


def draw(gen: torch.Generator) -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.standard_normal()),
        torch.rand(3).tolist(),
        torch.rand(2, generator=gen).tolist(),
    )


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_every_generator_continues_exactly_after_restore():
    gen = torch.Generator().manual_seed(7)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    saved = roundtrip(rng.capture_rng_state({"aug": gen}))
    expected = draw(gen)
    for _ in range(5):
        draw(gen)  # move everything on
    rng.restore_rng_state(saved, {"aug": gen})
    assert draw(gen) == expected


def test_each_source_is_restored_not_just_some():
    gen = torch.Generator().manual_seed(1)
    saved = rng.capture_rng_state({"aug": gen})
    first = draw(gen)
    rng.restore_rng_state(saved, {"aug": gen})
    random.random()  # perturb only Python's generator after restoring
    second = draw(gen)
    assert first[0] != second[0] and first[2:] == second[2:]


def test_missing_registered_generator_is_an_error():
    saved = rng.capture_rng_state()
    with pytest.raises(ValueError, match="'aug'.*absent"):
        rng.restore_rng_state(saved, {"aug": torch.Generator()})


def test_cuda_state_without_cuda_is_a_clear_error():
    saved = rng.capture_rng_state()
    saved["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            rng.restore_rng_state(saved)


def test_state_record_roundtrips_with_weights_only():
    state = TrainState(epoch=2, global_step=150, batch_idx=6, best_loss=0.25, extra={"tokens": 1234})
    data = state_to_dict(state, rng.capture_rng_state(), {"batch_size": 8}, run_metadata({"lr": 1e-3, "p": 3j}))
    loaded = roundtrip(data)
    assert state_from_dict(loaded) == state
    assert loaded["metadata"]["args"] == {"lr": 1e-3, "p": "3j"}
    assert loaded["metadata"]["torch_version"] == str(torch.__version__)
    assert rng.rng_states_equal(loaded["rng"], data["rng"])


def test_state_from_unknown_version_is_refused():
    with pytest.raises(ValueError, match="format_version"):
        state_from_dict({"format_version": 99})


def test_advance_rolls_over_at_epoch_end():
    state = TrainState()
    for _ in range(3):
        state.advance(batches_per_epoch=3)
    assert (state.epoch, state.batch_idx, state.global_step) == (1, 0, 3)


def test_signature_mismatch_names_both_sides():
    check_signature({"batch_size": 8, "world_size": 1}, {"batch_size": 8, "world_size": 1}, "ckpt")
    with pytest.raises(ResumeMismatchError) as err:
        check_signature({"batch_size": 8, "seed": 0}, {"batch_size": 16, "seed": 0}, "step_00000010")
    message = str(err.value)
    assert "batch_size: checkpoint has 8, this run has 16" in message and "step_00000010" in message
