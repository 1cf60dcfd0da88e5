"""Sharded state through DCP in one process (no process group: fast); the multi-rank cases are in
test_distributed.py. DCP's pickled metadata must never run code."""

from __future__ import annotations

import json
import pickle

import torch
from hostile import _Payload, verify
from torch import nn

from telepathy.checkpointer import Checkpointer
from telepathy.disk.manifest import hash_file, self_hash
from telepathy.store.checkpoint_store import UnsafeCheckpointError
from telepathy.train_state import ResumeMismatchError, TrainState


def train(steps: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_sharded_checkpoint_round_trip_in_one_process(tmp_path):
    model, optimizer = train()
    with Checkpointer(tmp_path, parts={"model": model}, optimizer=optimizer, sharded=True) as ckpt:
        path = ckpt.save(TrainState(global_step=3), "interval")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["sharded"] and {"__0_0.distcp", "sharded.metadata", "rank_00000.pt"} <= set(manifest["files"])
    fresh, fresh_opt = train(steps=0)
    with Checkpointer(tmp_path, parts={"model": fresh}, optimizer=fresh_opt, sharded=True) as ckpt:
        assert ckpt.resume().global_step == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert all(torch.equal(torch.as_tensor(saved[key][k]), torch.as_tensor(loaded[key][k])) for k in saved[key])
    plain, plain_opt = train(steps=0)
    with Checkpointer(tmp_path, parts={"model": plain}, optimizer=plain_opt) as ckpt:
        try:
            ckpt.resume()
            raise AssertionError("a sharded checkpoint must not load into an unsharded run")
        except ResumeMismatchError as exc:
            assert "sharded=True" in str(exc)


def test_a_pickle_payload_in_dcp_metadata_never_runs(tmp_path, capsys):
    model, optimizer = train()
    with Checkpointer(tmp_path, parts={"model": model}, optimizer=optimizer, sharded=True) as ckpt:
        path = ckpt.save(TrainState(global_step=3), "interval")
    marker = tmp_path / "pwned"
    (path / "sharded.metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    manifest = json.loads((path / "manifest.json").read_text())  # the attacker rewrites the manifest too
    manifest["files"]["sharded.metadata"] = {"bytes": (path / "sharded.metadata").stat().st_size,
                                             "xxh3_128": hash_file(path / "sharded.metadata")}  # fmt: skip
    manifest["manifest_xxh3_128"] = self_hash(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    code, out = verify(tmp_path, capsys, "--load")
    assert code == 1 and "not a safe checkpoint file" in out and "not allowed" in out and not marker.exists()
    fresh, fresh_opt = train(steps=0)
    with Checkpointer(tmp_path, parts={"model": fresh}, optimizer=fresh_opt, sharded=True) as ckpt:
        try:
            ckpt.resume()
            raise AssertionError("the payload must be refused")
        except UnsafeCheckpointError as exc:
            assert "io.open is not allowed in sharded checkpoint metadata" in str(exc)
    assert not marker.exists()
