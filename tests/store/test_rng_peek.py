"""The per-step snapshot reads NumPy's and Python's generator states from memory (telepathy.rng_peek): each read
must equal what get_state / getstate say, through every way a state can move, or the peek must stand aside."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from telepathy import rng, rng_peek


def _same_as_the_ordinary_calls() -> None:
    peeked = rng.capture_rng_state(packed=True)
    plain = rng.capture_rng_state()
    assert type(peeked["python"]["internal"]) is rng.PackedInts
    assert peeked["python"]["internal"].tensor.tolist() == plain["python"]["internal"]
    assert peeked["python"]["version"] == plain["python"]["version"]
    assert repr(peeked["python"]["gauss_next"]) == repr(plain["python"]["gauss_next"])
    for name in ("bit_generator", "pos", "has_gauss", "gauss"):
        assert type(peeked["numpy"][name]) is type(plain["numpy"][name]), name
        assert repr(peeked["numpy"][name]) == repr(plain["numpy"][name]), name
    assert peeked["numpy"]["key"].dtype == torch.int64
    assert torch.equal(peeked["numpy"]["key"], plain["numpy"]["key"])


def test_the_peek_is_used_here():
    """On this machine's NumPy and CPython the layout is found (else the figures in the README do not hold)."""
    assert rng_peek.peeker() is not None


MOVES = {
    "nothing": lambda: None,
    "numpy draws": lambda: np.random.random(5),
    "numpy gauss, cache filled": lambda: np.random.standard_normal(1),
    "numpy gauss, cache consumed only": lambda: np.random.standard_normal(1),  # after the one above: MT untouched
    "numpy reseeded": lambda: np.random.seed(12345),
    "numpy set_state changing only the cache": lambda: np.random.set_state(
        (*np.random.get_state()[:3], 1, -0.000123456789)
    ),
    "numpy set_state emptying the cache": lambda: np.random.set_state((*np.random.get_state()[:3], 0, 0.0)),
    "numpy key at its top": lambda: np.random.set_state(("MT19937", np.full(624, 2**32 - 1, np.uint32), 3, 0, 0.5)),
    "python draws": lambda: random.random(),
    "python gauss": lambda: random.gauss(0, 1),
    "python reseeded": lambda: random.seed(99),
    "python setstate only gauss_next": lambda: random.setstate((*random.getstate()[:2], 0.25)),
    "python index moved only": lambda: random.setstate((3, (*random.getstate()[1][:-1], 17), None)),
    "torch draws": lambda: torch.rand(3),
}


def test_every_move_of_a_state_is_seen():
    np.random.seed(1)
    random.seed(2)
    for name, move in MOVES.items():
        move()
        try:
            _same_as_the_ordinary_calls()
        except AssertionError as exc:
            raise AssertionError(f"after: {name}") from exc


def test_a_rebound_global_generator_is_not_peeked(monkeypatch):
    """Someone replaced np.random's global RandomState or random's bound getstate: the ordinary calls are used."""
    assert rng_peek.peeker() is not None
    monkeypatch.setattr(np.random.mtrand, "_rand", np.random.RandomState(5))
    assert rng_peek.peeker() is None
    monkeypatch.undo()
    other = random.Random(7)
    monkeypatch.setattr(random, "getstate", other.getstate)
    assert rng_peek.peeker() is None


def test_another_python_than_cpython_is_not_peeked(monkeypatch):
    import sys
    import types

    monkeypatch.setattr(sys, "implementation", types.SimpleNamespace(name="pypy"))
    monkeypatch.setattr(rng_peek, "_peeker", [])
    assert rng_peek.peeker() is None


def test_a_layout_the_probe_does_not_recognise_leaves_the_ordinary_calls(monkeypatch):
    monkeypatch.setattr(rng_peek, "_BITGEN_BYTES", rng_peek._BITGEN_BYTES + 8)  # as if bitgen_t had grown
    monkeypatch.setattr(rng_peek, "_peeker", [])
    assert rng_peek.peeker() is None
    np.random.standard_normal(3)
    _same_as_the_ordinary_calls()  # (the fallback path)


@pytest.mark.parametrize("seed", range(3))
def test_a_run_of_steps_with_random_moves_matches_at_every_step(seed):
    chooser = random.Random(seed)
    names = list(MOVES)
    np.random.seed(seed)
    random.seed(seed)
    for _ in range(60):
        MOVES[chooser.choice(names)]()
        _same_as_the_ordinary_calls()
