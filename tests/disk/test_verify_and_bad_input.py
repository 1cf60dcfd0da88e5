"""``python -m telepathy verify``, ``--strict_resume``, and bad command-line values refused before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hostile import _Payload, verify
from torch import nn

from telepathy.checkpointer import Checkpointer
from telepathy.disk.manifest import CheckpointInvalid, hash_file, self_hash
from telepathy.latentwire import config
from telepathy.train_state import TrainState


def make_run(save_dir, steps=(1, 2, 3)):
    model = nn.Linear(4, 4)
    with Checkpointer(save_dir, parts={"model": model}) as ckpt:
        for step in steps:
            ckpt.save(TrainState(global_step=step), "interval")
    return model


def test_verify_a_save_dir_and_one_checkpoint(tmp_path, capsys):
    make_run(tmp_path)
    code, out = verify(tmp_path, capsys, "--load")
    assert code == 0 and "3 of 3 checkpoints verified, 0 failed" in out
    step2 = tmp_path / "checkpoints" / "step_00000002"
    with open(step2 / "model.pt", "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 1]))
    code, out = verify(tmp_path, capsys)
    assert code == 1 and f"FAILED {step2}: model.pt: xxh3_128 " in out
    assert "2 of 3 checkpoints verified, 1 failed" in out
    assert verify(step2, capsys)[0] == 1 and verify(tmp_path / "checkpoints" / "step_00000003", capsys)[0] == 0
    (tmp_path / "empty").mkdir()
    code, out = verify(tmp_path / "empty", capsys)
    assert code == 2 and "is neither a telepathy checkpoint" in out
    assert verify(tmp_path / "nothing-here", capsys)[0] == 2  # "does not exist", on stderr as for every verb


def test_strict_resume_refuses_an_invalid_newest_checkpoint_and_changes_nothing(tmp_path):
    make_run(tmp_path)
    (tmp_path / "checkpoints" / "step_00000003" / "state.pt").unlink()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with Checkpointer(tmp_path, parts={"model": nn.Linear(4, 4)}) as ckpt:
        with pytest.raises(CheckpointInvalid, match="state.pt: missing; strict resume refuses to fall back"):
            ckpt.resume(strict=True)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
        assert ckpt.resume().global_step == 2  # without strict: the previous one


def test_save_dir_that_is_a_file_or_unwritable_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        config.parse(["--save_dir", str(tmp_path / "file" / "run")])
    assert err.value.code == 2
    done = subprocess.run([sys.executable, "-m", "telepathy.preemptible_training", "--save_dir",
                           str(tmp_path / "file")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "exists and is not a directory" in done.stderr
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only filesystem
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        readonly.chmod(0o500)
    try:
        with pytest.raises(SystemExit):
            config.parse(["--save_dir", str(readonly / "run")])
        assert "is not writable" in config.save_dir_problem(readonly / "run")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(readonly)], check=True)


def test_pickle_payload_is_refused_by_verify_load_even_with_a_matching_manifest(tmp_path, capsys):
    make_run(tmp_path, steps=(1,))
    marker = tmp_path / "pwned"
    step1 = tmp_path / "checkpoints" / "step_00000001"
    (step1 / "model.pt").unlink()
    torch.save({"weight": _Payload(str(marker))}, step1 / "model.pt")
    manifest = json.loads((step1 / "manifest.json").read_text())  # the attacker rewrites the manifest too
    manifest["files"]["model.pt"] = {"bytes": (step1 / "model.pt").stat().st_size,
                                     "xxh3_128": hash_file(step1 / "model.pt")}  # fmt: skip
    manifest["manifest_xxh3_128"] = self_hash(manifest)
    (step1 / "manifest.json").write_text(json.dumps(manifest))
    assert verify(tmp_path, capsys)[0] == 0  # bytes as listed ...
    code, out = verify(tmp_path, capsys, "--load")
    assert code == 1 and "is not a safe checkpoint file" in out and not marker.exists()  # ... but never unpickled


def test_part_names_that_would_escape_the_checkpoint_are_refused(tmp_path):
    with Checkpointer(tmp_path / "run", parts={"adapter_../../x": nn.Linear(2, 2)}) as ckpt:
        with pytest.raises(ValueError, match="is not a plain file name"):
            ckpt.save(TrainState(global_step=1), "interval")
    assert not (tmp_path / "x.pt").exists() and list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_resume_refuses_to_start_from_scratch_when_no_checkpoint_verifies(tmp_path):
    make_run(tmp_path, steps=(1, 2))
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_0000000{step}" / "model.pt").write_bytes(b"damaged")
    with Checkpointer(tmp_path, parts={"model": nn.Linear(4, 4)}) as ckpt:
        with pytest.raises(CheckpointInvalid, match="none of the 2 checkpoints verifies"):
            ckpt.resume()


def test_status_and_list_read_a_save_dir_without_importing_torch(tmp_path):
    """An operator runs them over fifty jobs: they must start in a fraction of a second (torch takes ~2 s)."""
    make_run(tmp_path)
    code = ("import sys; from telepathy.__main__ import main; "
            "assert main(['status', sys.argv[1]]) == 0 and main(['list', sys.argv[1]]) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "3 committed" in done.stdout and done.stdout.count(" yes ") == 3
