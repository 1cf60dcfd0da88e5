"""Rule 3: a checkpoint that verifies (its manifest re-sealed after tampering) but cannot be used is skipped like a
corrupt one: ``resume()`` falls back to the next older checkpoint with a warning, ``strict=True`` raises
CheckpointInvalid (exit 3 for programs), never a crash, a half-applied state or a restart loop. A manifest with
absurd fields never crashes a live run's save or ``telepathy prune``."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from adversary import (
    BATCHES_PER_EPOCH,
    DELETE,
    Payload,
    assert_no_traceback,
    assert_one_line_error,
    assert_still_verified,
    checkpointer,
    cli,
    load_raw,
    make_run,
    program,
    read_manifest_doc,
    reseal,
    reseal_raw,
    save_raw,
    step_dir,
    storage_lie_tensor,
    tell_storage_lie,
    verified,
)

from telepathy.disk.events import read_events
from telepathy.errors import CheckpointInvalid
from telepathy.train_state import TrainState, within_epoch


def edit(file, change):
    """A tamper: load ``file`` of the newest checkpoint, change it, save it back."""

    def apply(directory, tmp_path):
        obj = load_raw(directory / file)
        result = change(obj, tmp_path)
        save_raw(directory / file, obj if result is None else result)

    return apply


def setitem(mapping, path, value):
    *parents, last = path
    for key in parents:
        mapping = mapping[key]
    mapping[last] = value


def state_field(*path, value):
    return edit("state.pt", lambda st, tmp: setitem(st, path, value))


def lie(directory, tmp_path):
    sd = load_raw(directory / "model.pt")
    sd["weight"] = storage_lie_tensor()
    save_raw(directory / "model.pt", sd)
    tell_storage_lie(directory / "model.pt", "size")


TAMPERS = {
    # files that would run code
    "unsafe model.pt": edit("model.pt", lambda sd, tmp: setitem(sd, ["weight"], Payload(str(tmp / "pwned")))),
    "unsafe optimizer.pt": edit("optimizer.pt", lambda o, tmp: setitem(o, ["optimizer"], Payload(str(tmp / "pwned")))),
    "unsafe state.pt": state_field("extra", value=Payload("/nonexistent/pwned")),
    "storage-size lie": lie,
    # a position this data does not have
    "batch_idx 10**9": state_field("batch_idx", value=10**9),
    "batch_idx = batches per epoch": state_field("batch_idx", value=BATCHES_PER_EPOCH),
    "batch_idx -5": state_field("batch_idx", value=-5),
    "epoch -1": state_field("epoch", value=-1),
    "epoch 2**63": state_field("epoch", value=2**63),
    # wrong types in state.pt
    "epoch '3'": state_field("epoch", value="3"),
    "epoch 3.0": state_field("epoch", value=3.0),
    "epoch True": state_field("epoch", value=True),
    "global_step None": state_field("global_step", value=None),
    "best_loss 'low'": state_field("best_loss", value="low"),
    "best_loss tensor": state_field("best_loss", value=torch.tensor(1.0)),
    "extra a list": state_field("extra", value=[1, 2]),
    "format_version 2": state_field("format_version", value=2),
    "signature a string": state_field("signature", value="batch_size=8"),
    "signature a list": state_field("signature", value=[8, 0, 1]),
    "state.pt a list": edit("state.pt", lambda st, tmp: [st]),
    "state.pt a tensor": edit("state.pt", lambda st, tmp: torch.zeros(3)),
    "state.pt only a format_version": edit("state.pt", lambda st, tmp: {"format_version": 1}),
    # RNG states that cannot be restored
    "rng missing": edit("state.pt", lambda st, tmp: st.pop("rng")),
    "rng empty": state_field("rng", value={}),
    "rng a string": state_field("rng", value="seed=0"),
    "rng python internal short": state_field("rng", "python", "internal", value=[1, 2, 3]),
    "rng python version 'x'": state_field("rng", "python", "version", value="x"),
    "rng torch_cpu 3 bytes": state_field("rng", "torch_cpu", value=torch.zeros(3, dtype=torch.uint8)),
    "rng torch_cpu a string": state_field("rng", "torch_cpu", value="state"),
    "rng numpy key short": state_field("rng", "numpy", "key", value=torch.zeros(3, dtype=torch.int64)),
    "rng numpy bit_generator": state_field("rng", "numpy", "bit_generator", value="Nonsense"),
    # parts and optimizer that do not load
    "model weight an int": edit("model.pt", lambda sd, tmp: setitem(sd, ["weight"], 5)),
    "model weight a string": edit("model.pt", lambda sd, tmp: setitem(sd, ["weight"], "w")),
    "model weight None": edit("model.pt", lambda sd, tmp: setitem(sd, ["weight"], None)),
    "model weight deep lists": edit("model.pt", lambda sd, tmp: setitem(sd, ["weight"], [[[[0.0]]]])),
    "model.pt a list": edit("model.pt", lambda sd, tmp: [sd]),
    "optimizer.pt a list": edit("optimizer.pt", lambda o, tmp: [o]),
    "optimizer state an int": edit("optimizer.pt", lambda o, tmp: setitem(o, ["optimizer"], 5)),
    "optimizer without param groups": edit("optimizer.pt",
                                           lambda o, tmp: setitem(o, ["optimizer"], {"state": {}, "param_groups": []})),
    "optimizer state a string": edit("optimizer.pt", lambda o, tmp: setitem(o, ["optimizer", "state"], "x")),
}  # fmt: skip


def tamper(run3, tmp_path, how):
    newest = run3[-1]
    TAMPERS[how](newest, tmp_path)
    reseal(newest)
    assert newest in verified(newest.parent.parent), "the tampered checkpoint must still verify"
    return newest


@pytest.mark.parametrize("how", sorted(TAMPERS))
def test_a_verified_but_unusable_checkpoint_is_skipped_with_a_warning(save_dir, tmp_path, run3, how, caplog):
    newest = tamper(run3, tmp_path, how)
    with checkpointer(save_dir) as ckpt:
        model = ckpt.parts["model"]
        state = ckpt.resume(check=within_epoch(BATCHES_PER_EPOCH))
        expected = load_raw(run3[1] / "model.pt")
        assert state.global_step == 2 and state.batch_idx == 2
        assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected), "not step 2's weights"
    assert "skipping checkpoint" in caplog.text and str(newest) in caplog.text
    assert not (tmp_path / "pwned").exists()
    assert_still_verified(run3)


@pytest.mark.parametrize("how", sorted(TAMPERS))
def test_strict_resume_refuses_a_verified_but_unusable_checkpoint_and_changes_nothing(save_dir, tmp_path, run3, how):
    tamper(run3, tmp_path, how)
    with checkpointer(save_dir) as ckpt:
        before = {k: v.clone() for k, v in ckpt.parts["model"].state_dict().items()}
        rng = torch.get_rng_state()
        with pytest.raises(CheckpointInvalid):
            ckpt.resume(strict=True, check=within_epoch(BATCHES_PER_EPOCH))
        after = ckpt.parts["model"].state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint was half applied"
        assert torch.equal(rng, torch.get_rng_state())
    assert not (tmp_path / "pwned").exists()
    assert_still_verified(run3)


def test_cuda_rng_states_on_a_cpu_machine_are_refused_before_anything_is_applied(save_dir, tmp_path, run3):
    """Saved on GPUs, resumed without: skipped, or refused as a mismatch (exit 3), but never half applied."""
    from telepathy.errors import CannotResume

    state_field("rng", "cuda", value=[torch.zeros(16, dtype=torch.uint8)])(run3[-1], tmp_path)
    reseal(run3[-1])
    with checkpointer(save_dir) as ckpt:
        before = {k: v.clone() for k, v in ckpt.parts["model"].state_dict().items()}
        try:
            state = ckpt.resume()
        except CannotResume:
            after = ckpt.parts["model"].state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "refused after loading the weights"
        else:
            assert state.global_step == 2
    assert_still_verified(run3)


BLOB_TAMPERS = {
    "reference not in the manifest": {"__telepathy_blob__": "f" * 32},
    "reference name escapes": {"__telepathy_blob__": "../../../outside/weights"},
    "reference name an int": {"__telepathy_blob__": 12345},
    "dtype complex64": {"dtype": "torch.complex64"},
    "dtype missing": {"dtype": None},
    "shape 10**9": {"shape": [10**9]},
    "shape a string": {"shape": "128x128"},
    "shape too small": {"shape": [64, 64]},
    "shape negative": {"shape": [-1, -16384]},
}


@pytest.mark.parametrize("file", ["model.pt", "optimizer.pt"])
@pytest.mark.parametrize("how", sorted(BLOB_TAMPERS))
def test_a_bad_blob_reference_is_skipped_and_refused_when_strict(save_dir, file, how, caplog):
    paths = make_run(save_dir, fmt="differential")
    newest = paths[-1]
    obj = load_raw(newest / file)
    if file == "model.pt":
        ref = obj["weight"]
    else:
        ref = next(s["exp_avg"] for s in obj["optimizer"]["state"].values() if isinstance(s["exp_avg"], dict))
    assert "__telepathy_blob__" in ref
    for key, value in BLOB_TAMPERS[how].items():
        if value is None:
            ref.pop(key)
        else:
            ref[key] = value
    save_raw(newest / file, obj)
    reseal(newest)
    assert newest in verified(save_dir)
    with checkpointer(save_dir, fmt="differential") as ckpt:
        assert ckpt.resume().global_step == 2
    assert "skipping checkpoint" in caplog.text
    with checkpointer(save_dir, fmt="differential") as ckpt, pytest.raises(CheckpointInvalid):
        ckpt.resume(strict=True)
    done = cli("verify", str(newest), "--load")
    assert done.code == 1 and "Traceback" not in done.text
    assert_still_verified(paths)


def test_a_checkpoint_with_a_deeply_nested_extra_does_not_poison_the_next_save(save_dir, run3):
    from adversary import deep_nesting_opcodes, splice

    state_file = run3[-1] / "state.pt"
    st = load_raw(state_file)
    st["extra"] = {"history": "DEEP-MARKER"}
    save_raw(state_file, st)
    splice(state_file, "DEEP-MARKER", deep_nesting_opcodes(100_000))
    reseal(run3[-1])
    with checkpointer(save_dir) as ckpt:
        state = ckpt.resume()
        state.global_step += 1
        saved = ckpt.save(state, "interval")  # the resumed run must still be able to save
    assert saved is not None and saved.name == f"step_{state.global_step:08d}"
    with checkpointer(save_dir) as ckpt:
        assert ckpt.resume().global_step == state.global_step
    assert_still_verified(run3[:2])


def test_after_falling_back_the_next_save_at_that_step_is_usable(save_dir, tmp_path, run3):
    """No restart loop: resumed at 2 past an unusable 3, the run's own save at step 3 must be the one a later resume
    uses (not the unusable one kept because it verifies), or every preemption at step 3 replays from 2."""
    tamper(run3, tmp_path, "batch_idx 10**9")
    with checkpointer(save_dir) as ckpt:
        state = ckpt.resume(check=within_epoch(BATCHES_PER_EPOCH))
        assert state.global_step == 2
        state.advance(BATCHES_PER_EPOCH)
        ckpt.save(state, "signal:SIGTERM")
    with checkpointer(save_dir) as ckpt:
        again = ckpt.resume(check=within_epoch(BATCHES_PER_EPOCH))
    assert again.global_step == 3, "the save at step 3 was discarded in favour of the unusable checkpoint"
    assert_still_verified(run3[:2])


def test_when_no_checkpoint_is_usable_resume_refuses_instead_of_starting_over(save_dir, tmp_path, run3):
    for directory in run3:
        TAMPERS["rng empty"](directory, tmp_path)
        reseal(directory)
    with checkpointer(save_dir) as ckpt, pytest.raises(CheckpointInvalid, match="none of the 3"):
        ckpt.resume()
    assert_still_verified(run3)


# ------------------------------------------------------------------------------- as programs: exit codes
def tool_run(save_dir, *extra, epochs=1):
    return program("telepathy.test_preemption", "--save_dir", str(save_dir), "--epochs", str(epochs), "--samples",
                   "64", "--batch_size", "16", "--interval", "1000", "--save_every_steps", "1", "--duration", "60",
                   *extra)  # fmt: skip


PROGRAM_TAMPERS = ["unsafe state.pt", "batch_idx 10**9", "rng empty"]


@pytest.fixture(scope="module")
def tool_template(tmp_path_factory):
    template = tmp_path_factory.mktemp("tool") / "run"
    done = tool_run(template)  # 4 steps, checkpoints 2, 3, 4 kept
    assert done.code == 0, done.text
    return template


@pytest.fixture
def tool_save_dir(save_dir, tool_template):
    shutil.copytree(tool_template, save_dir, symlinks=True)
    return save_dir


@pytest.mark.slow
@pytest.mark.parametrize("how", PROGRAM_TAMPERS)
def test_the_test_tool_falls_back_past_an_unusable_checkpoint(tool_save_dir, tmp_path, how):
    newest = step_dir(tool_save_dir, 4)
    TAMPERS[how](newest, tmp_path)
    reseal(newest)
    done = tool_run(tool_save_dir, epochs=2)
    assert_no_traceback(done)
    assert done.code == 0 and "skipping checkpoint" in done.text and "global step 3" in done.text, done.text[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("how", PROGRAM_TAMPERS)
def test_the_test_tool_with_strict_resume_exits_3_in_one_line(tool_save_dir, tmp_path, how):
    newest = step_dir(tool_save_dir, 4)
    TAMPERS[how](newest, tmp_path)
    reseal(newest)
    before = verified(tool_save_dir)
    done = tool_run(tool_save_dir, "--strict_resume", epochs=2)
    assert_one_line_error(done, 3)
    assert verified(tool_save_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize("how", ["batch_idx 10**9", "rng empty"])
def test_the_main_job_never_restarts_a_strict_refusal(tool_save_dir, tmp_path, how):
    newest = step_dir(tool_save_dir, 4)
    TAMPERS[how](newest, tmp_path)
    reseal(newest)
    done = program("telepathy.preemptible_training", "--save_dir", str(tool_save_dir), "--max_restarts", "3",
                   "--restart_backoff", "0.1", "--", "python", "-m", "telepathy.test_preemption", "--save_dir",
                   str(tool_save_dir), "--epochs", "2", "--samples", "64", "--batch_size", "16", "--interval",
                   "1000", "--save_every_steps", "1", "--strict_resume")  # fmt: skip
    assert_no_traceback(done)
    assert done.code == 3, done.text[-2000:]
    assert not [e for e in read_events(tool_save_dir) if e["event"] == "restart"]


# ------------------------------------------------------------------------------------ absurd manifest fields
ABSURD = {
    "metric 10**400": ("metric", 10**400),
    "metric inf": ("metric", math.inf),
    "metric -inf": ("metric", -math.inf),
    "metric nan": ("metric", math.nan),
    "metric 1e300": ("metric", 1e300),
    "metric 'low'": ("metric", "low"),
    "metric [1]": ("metric", [1]),
    "metric true": ("metric", True),
    "step -1": ("step", -1),
    "step 10**30": ("step", 10**30),
    "step '3'": ("step", "3"),
    "step 3.5": ("step", 3.5),
    "epoch 10**400": ("epoch", 10**400),
    "batch_idx 10**20": ("batch_idx", 10**20),
    "world_size 'abc'": ("world_size", "abc"),
    "world_size 10**400": ("world_size", 10**400),
    "world_size -1": ("world_size", -1),
    "format_version 3": ("format_version", 3),
    "files a list": ("files", ["model.pt"]),
    "files empty": ("files", {}),
    "file entry an int": ("files", "entry-int"),
    "file bytes -1": ("files", "bytes-neg"),
    "file bytes 10**30": ("files", "bytes-huge"),
    "file bytes '12'": ("files", "bytes-str"),
    "blobs a list": ("blobs", ["x"]),
    "blob name not hex": ("blobs", {"zz": {"codec": "raw", "bytes": 1, "stored_xxh3_128": "0"}}),
    "blob codec gz": ("blobs", {"a" * 32: {"codec": "gz", "bytes": 1, "stored_xxh3_128": "0"}}),
    "reason a dict": ("reason", {"why": ["nested"]}),
    "emergency 'maybe'": ("emergency", "maybe"),
    "no self-hash": ("manifest_xxh3_128", DELETE),
}


def make_absurd(directory, how):
    key, value = ABSURD[how]
    doc = read_manifest_doc(directory)
    if key == "files" and isinstance(value, str):
        entry = doc["files"]["model.pt"]
        doc["files"]["model.pt"] = {"entry-int": 5, "bytes-neg": {**entry, "bytes": -1},
                                    "bytes-huge": {**entry, "bytes": 10**30},
                                    "bytes-str": {**entry, "bytes": str(entry["bytes"])}}[value]  # fmt: skip
    elif value is DELETE:
        doc.pop(key)
        (directory / "manifest.json").write_text(json.dumps(doc))
        return
    else:
        doc[key] = value
    reseal_raw(directory, doc)


@pytest.mark.parametrize("how", sorted(ABSURD))
def test_a_manifest_with_absurd_fields_never_crashes_a_live_runs_resume_save_or_prune(save_dir, run3, how):
    make_absurd(run3[-1], how)
    with checkpointer(save_dir, keep_last=1, keep_best=True) as ckpt:
        state = ckpt.resume(check=within_epoch(BATCHES_PER_EPOCH))
        assert state.global_step in (2, 3)
        state = TrainState(epoch=0, global_step=4, batch_idx=4)
        newest = ckpt.save(state, "interval", metric=0.5)
    assert_still_verified([newest])
    with checkpointer(save_dir) as ckpt:
        assert ckpt.resume().global_step == 4


@pytest.mark.parametrize("how", sorted(ABSURD))
def test_a_manifest_with_absurd_fields_never_crashes_the_operator_tools(save_dir, run3, how):
    make_absurd(run3[-1], how)
    for args in (["list", str(save_dir)], ["list", str(save_dir), "--json"], ["status", str(save_dir)],
                 ["status", str(save_dir), "--json"], ["verify", str(save_dir)],
                 ["prune", str(save_dir), "--keep_last", "1", "--dry-run"]):  # fmt: skip
        done = cli(*args)
        assert "Traceback" not in done.text and done.code in (0, 1), f"{args}: {done.text[-2000:]}"
    done = cli("prune", str(save_dir), "--keep_last", "1")
    assert "Traceback" not in done.text and done.code == 0, done.text[-2000:]
    assert verified(save_dir), "prune left no checkpoint that verifies"
