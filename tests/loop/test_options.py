"""CheckpointOptions: one dataclass, the flags generated from it, bad values refused at construction, and the
save policy it configures (every N steps, interval) acting through a real Checkpointer."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from telepathy import Checkpointer, CheckpointOptions, TrainState, UsageError, training_signals
from telepathy.options import FORMATS, add_checkpoint_flags


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_checkpoint_flags(parser)
    return parser.parse_args(list(argv))


def test_flags_round_trip_into_options():
    argv = ["--checkpoint_interval", "30", "--save_every_steps", "1", "--keep_last", "5", "--format", "compressed"]
    options = CheckpointOptions.from_args(parse(*argv, "--async_save"))
    assert options == CheckpointOptions(interval=30, every_steps=1, keep_last=5, format="compressed", async_save=True)
    assert CheckpointOptions.from_args(parse()) == CheckpointOptions()  # the flags' defaults are the dataclass's
    assert CheckpointOptions.from_args(parse("--differential")).format == "differential"  # the older flags
    assert CheckpointOptions.from_args(parse("--differential", "--compress")).format == "compressed"
    with pytest.raises(UsageError, match="contradicts"):
        CheckpointOptions.from_args(parse("--format", "sharded", "--compress"))


@pytest.mark.parametrize("argv", [["--checkpoint_interval", "nan"], ["--checkpoint_interval", "0"],
                                  ["--save_every_steps", "0"], ["--keep_last", "0"], ["--format", "zip"]])  # fmt: skip
def test_bad_flag_values_are_usage_errors(argv):
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parse(*argv)


@pytest.mark.parametrize(
    "fields",
    [{"interval": 0}, {"interval": float("inf")}, {"interval": -5}, {"every_steps": 0}, {"every_steps": 1.5},
     {"keep_last": 0}, {"format": "zip"}, {"agree_every": 0}],
)  # fmt: skip
def test_bad_values_fail_at_construction_not_at_the_first_step(fields, tmp_path):
    with pytest.raises(UsageError):
        CheckpointOptions(**fields)
    with pytest.raises(UsageError):
        Checkpointer(tmp_path / "run", parts={"m": nn.Linear(2, 2)}, **fields)
    assert not (tmp_path / "run").exists(), "nothing created for a refused configuration"


def test_every_format_is_a_choice_and_the_older_keywords_map_onto_it():
    assert set(FORMATS) == {"full", "differential", "compressed", "sharded"}
    assert CheckpointOptions.resolve(None, {"differential": True}).format == "differential"
    assert CheckpointOptions.resolve(None, {"compress": True}).format == "compressed"
    with pytest.raises(TypeError, match="unknown checkpoint option"):
        CheckpointOptions.resolve(None, {"intervall": 3})


def test_every_step_saves_at_every_step_and_reasons_say_why(tmp_path):
    training_signals.install_signal_handlers()
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Checkpointer(tmp_path, parts={"m": model}, optimizer=opt, every_steps=1, interval=None,
                      keep_last=None) as ckpt:  # fmt: skip
        state = ckpt.resume()
        for _ in range(5):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            state.advance(100)
            assert ckpt.step_boundary(state) is False
        steps = [ref.step for ref in ckpt.store.committed()]
    assert steps == [1, 2, 3, 4, 5]


def test_every_n_steps(tmp_path):
    with Checkpointer(tmp_path, parts={"m": nn.Linear(2, 2)}, every_steps=3, interval=None, keep_last=None) as ckpt:
        state = TrainState()
        for _ in range(7):
            state.advance(100)
            ckpt.step_boundary(state)
        assert [ref.step for ref in ckpt.store.committed()] == [3, 6]
