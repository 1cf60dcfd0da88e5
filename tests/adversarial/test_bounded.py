"""Rule 2, bounded loading and export: a tiny file describing a huge structure (shared references) or tensors that
claim more bytes than their storage are refused with a clear error (UnsafeCheckpointError), in under 10 s; a
resume skips such a checkpoint; export refuses to expand far beyond the bytes stored; reading a manifest never
takes unbounded memory or recursion."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pytest
import torch
import xxhash
from adversary import (
    REPO,
    assert_no_traceback,
    assert_one_line_error,
    assert_still_verified,
    checkpointer,
    cli,
    load_raw,
    make_run,
    python_code,
    read_manifest_doc,
    reseal,
    save_raw,
    shared_bomb,
    storage_lie_tensor,
    tell_storage_lie,
    write_over,
)

from telepathy.errors import CheckpointInvalid, UnsafeCheckpointError
from telepathy.store.formats import load_part

QUICK = 10.0  # seconds a refusal may take


def plant(directory, file, value):
    """Put ``value`` inside an otherwise valid part file and re-seal the checkpoint."""
    obj = load_raw(directory / file)
    if file == "model.pt":
        obj["weight"] = value
    elif file == "optimizer.pt":
        obj["scheduler"] = value
    else:
        obj["extra"] = {"planted": value}
    save_raw(directory / file, obj)
    reseal(directory)


SHAPES = ["lists", "dicts", "tuples", "wide", pytest.param("tensors", marks=pytest.mark.slow)]


def bomb(shape):
    return shared_bomb("lists", leaf=torch.zeros(2)) if shape == "tensors" else shared_bomb(shape)


# -------------------------------------------------------------------------------------------- shared refs
@pytest.mark.slow  # two refusals of 2,000,000 visits each: 2-6 s
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("file", ["model.pt", "optimizer.pt", "state.pt"])
def test_a_shared_reference_bomb_is_skipped_quickly_and_refused_when_strict(save_dir, run3, file, shape, caplog):
    plant(run3[-1], file, bomb(shape))
    assert (run3[-1] / file).stat().st_size < 64 << 10  # a tiny file
    started = time.monotonic()
    with checkpointer(save_dir) as ckpt:
        state = ckpt.resume()
    assert time.monotonic() - started < QUICK
    assert state.global_step == 2 and "skipping checkpoint" in caplog.text and file in caplog.text
    started = time.monotonic()
    with checkpointer(save_dir) as ckpt, pytest.raises(UnsafeCheckpointError, match="structure"):
        ckpt.resume(strict=True)
    assert time.monotonic() - started < QUICK
    assert_still_verified(run3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("operation", ["load_part", "verify --load", "export"])
def test_operator_tools_refuse_a_shared_reference_bomb_quickly(save_dir, run3, operation, shape):
    newest = run3[-1]
    plant(newest, "model.pt", bomb(shape))
    started = time.monotonic()
    if operation == "load_part":
        with pytest.raises(UnsafeCheckpointError, match="structure"):
            load_part(newest, "model")
    elif operation == "verify --load":
        done = cli("verify", str(newest), "--load")
        assert done.code == 1 and done.out.startswith(f"FAILED {newest}") and "Traceback" not in done.text, done.text
    else:
        done = cli("export", str(save_dir), "--checkpoint", str(newest), "--out", str(save_dir / "export"))
        assert_one_line_error(done, 1)
        assert not (save_dir / "export" / "model.safetensors").exists()
    assert time.monotonic() - started < QUICK
    assert_still_verified(run3)


# ------------------------------------------------------------------------------------------ storage lies
LIES = ["size", "offset", "stride", "numel"]


def plant_lie(directory, file, kind):
    plant(directory, file, storage_lie_tensor())
    tell_storage_lie(directory / file, kind)
    reseal(directory)


@pytest.mark.parametrize("kind", LIES)
def test_load_part_refuses_a_storage_size_lie_as_unsafe(run3, kind):
    plant_lie(run3[-1], "model.pt", kind)
    started = time.monotonic()
    with pytest.raises(UnsafeCheckpointError):
        load_part(run3[-1], "model")
    assert time.monotonic() - started < QUICK


@pytest.mark.parametrize("kind", LIES)
@pytest.mark.parametrize("file", ["model.pt", "optimizer.pt", "state.pt"])
def test_a_resume_skips_a_storage_size_lie_and_strict_refuses_it(save_dir, run3, file, kind, caplog):
    plant_lie(run3[-1], file, kind)
    with checkpointer(save_dir) as ckpt:
        assert ckpt.resume().global_step == 2
    assert "skipping checkpoint" in caplog.text and file in caplog.text
    with checkpointer(save_dir) as ckpt, pytest.raises(CheckpointInvalid):
        ckpt.resume(strict=True)
    assert_still_verified(run3)


@pytest.mark.parametrize("kind", LIES)
@pytest.mark.parametrize("operation", ["verify --load", "export"])
def test_operator_tools_refuse_a_storage_size_lie_in_one_line(save_dir, run3, operation, kind):
    newest = run3[-1]
    plant_lie(newest, "model.pt", kind)
    if operation == "verify --load":
        done = cli("verify", str(newest), "--load")
        assert done.code == 1 and done.out.startswith(f"FAILED {newest}") and "Traceback" not in done.text, done.text
    else:
        done = cli("export", str(save_dir), "--checkpoint", str(newest), "--out", str(save_dir / "export"))
        assert_one_line_error(done, 1)
        assert not (save_dir / "export" / "model.safetensors").exists()
    assert_still_verified(run3)


# ------------------------------------------------------------------------------------------------ expansion
def measure(fn):
    """(result or exception, seconds, peak bytes Python allocated) of ``fn()``."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        outcome = fn()
    except Exception as exc:  # noqa: BLE001
        outcome = exc
    seconds = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return outcome, seconds, peak


def views_of_one_storage(directory, copies=1000):
    base = torch.zeros(64 << 10)  # 256 KiB stored once
    save_raw(directory / "model.pt", {f"w{i}": base.view(256, 256) for i in range(copies)})
    reseal(directory)


def refs_to_one_blob(directory, copies=4000):
    sd = load_raw(directory / "model.pt")  # {"weight": <blob reference>, "bias": tensor}
    save_raw(directory / "model.pt", {**{f"w{i}": sd["weight"] for i in range(copies)}, "bias": sd["bias"]})
    reseal(directory)


@pytest.mark.parametrize("fmt", ["full", "differential"])
def test_export_refuses_to_expand_far_beyond_the_stored_bytes(save_dir, fmt):
    paths = make_run(save_dir, fmt=fmt)
    newest = paths[-1]
    (views_of_one_storage if fmt == "full" else refs_to_one_blob)(newest)
    doc = read_manifest_doc(newest)
    stored = doc["files"]["model.pt"]["bytes"] + sum(b["bytes"] for b in (doc.get("blobs") or {}).values())
    out = save_dir / "export"
    done, seconds, peak = measure(lambda: cli("export", str(save_dir), "--checkpoint", str(newest), "--out", str(out)))
    assert_one_line_error(done, 1)
    assert "expand" in done.err and not (out / "model.safetensors").exists()
    assert seconds < QUICK
    assert peak < 2 * stored + (64 << 20), f"export materialised {peak >> 20} MiB from {stored >> 10} KiB stored"
    assert_still_verified(paths)


def test_loading_many_references_to_one_blob_stays_bounded(save_dir):
    paths = make_run(save_dir, fmt="differential")
    refs_to_one_blob(paths[-1])
    doc = read_manifest_doc(paths[-1])
    stored = doc["files"]["model.pt"]["bytes"] + sum(b["bytes"] for b in doc["blobs"].values())
    outcome, seconds, peak = measure(lambda: load_part(paths[-1], "model"))
    assert seconds < QUICK
    assert isinstance(outcome, UnsafeCheckpointError) or peak < 2 * stored + (64 << 20), (
        f"load_part materialised {peak >> 20} MiB from {stored >> 10} KiB stored"
    )


@pytest.mark.slow
def test_a_compressed_blob_that_inflates_past_its_tensor_is_refused_without_inflating_it(save_dir):
    import zstandard

    paths = make_run(save_dir, fmt="differential")
    newest = paths[-1]
    inflated = 1 << 30  # 1 GiB of zeros behind a ~40 KiB frame, for a reference that says 128 x 128 float32
    digest = xxhash.xxh3_128()
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=inflated)
    chunk = bytes(8 << 20)
    frame = bytearray()
    for _ in range(inflated // len(chunk)):
        frame += compressor.compress(chunk)
        digest.update(chunk)
    frame += compressor.flush()
    name = digest.hexdigest()
    blob = save_dir / "blobs" / name[:2] / f"{name}.zst"
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(bytes(frame))
    sd = load_raw(newest / "model.pt")
    sd["weight"] = {**sd["weight"], "__telepathy_blob__": name}
    save_raw(newest / "model.pt", sd)
    blobs = dict(read_manifest_doc(newest)["blobs"])
    blobs[name] = {"codec": "zst", "bytes": len(frame), "stored_xxh3_128": xxhash.xxh3_128_hexdigest(bytes(frame))}
    reseal(newest, {"blobs": blobs})
    code = (
        "import resource, sys, torch; sys.path.insert(0, sys.argv[2]); from adversary import checkpointer\n"
        "with checkpointer(__import__('pathlib').Path(sys.argv[1]), fmt='differential') as ckpt:\n"
        "    step = ckpt.resume().global_step\n"
        "print(step, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = python_code(code, str(save_dir), str(REPO / "tests" / "helpers"), timeout=120, limit_memory=4 << 30)
    assert_no_traceback(done)
    step, max_rss_kib = (int(x) for x in done.out.split()[-2:])
    assert step == 2
    assert max_rss_kib < 768 << 10, f"the resume used {max_rss_kib >> 10} MiB to refuse a 128 x 128 tensor"


# ---------------------------------------------------------------------------------- manifests that explode
def deep_json(depth=200_000):
    return ("[" * depth + "]" * depth).encode()


@pytest.mark.parametrize("operation", ["resume", "list", "verify", "status", "prune", "export"])
def test_a_deeply_nested_manifest_is_a_damaged_checkpoint_not_a_crash(save_dir, run3, operation, caplog):
    write_over(run3[-1] / "manifest.json", deep_json())
    if operation == "resume":
        with checkpointer(save_dir) as ckpt:
            assert ckpt.resume().global_step == 2
        assert "skipping checkpoint" in caplog.text
    else:
        extra = {"prune": ["--keep_last", "1"], "export": ["--out", str(save_dir / "export")]}.get(operation, [])
        done = cli(operation, str(save_dir), *extra)
        assert "Traceback" not in done.text and done.code in (0, 1), done.text[-2000:]
    # prune --keep_last 1 keeps the newest (damaged) and the newest that verifies (step 2), and deletes step 1 by
    # policy, as for any damaged newest checkpoint; the others touch nothing
    assert_still_verified(run3[1:2] if operation == "prune" else run3[:2])


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["resume", "list", "verify"])
def test_a_huge_manifest_is_refused_without_reading_it_into_memory(save_dir, run3, operation):
    manifest = run3[-1] / "manifest.json"
    manifest.unlink()
    with open(manifest, "wb") as f:
        f.truncate(4 << 30)  # 4 GiB, sparse: it costs no disk, only what reading it would cost
    if operation == "resume":
        code = (
            "import sys; sys.path.insert(0, sys.argv[2]); from adversary import checkpointer\n"
            "with checkpointer(__import__('pathlib').Path(sys.argv[1])) as ckpt:\n"
            "    print('resumed at', ckpt.resume().global_step)\n"
        )
        done = python_code(code, str(save_dir), str(REPO / "tests" / "helpers"), timeout=120, limit_memory=3 << 30)
        assert_no_traceback(done)
        assert "resumed at 2" in done.out
    else:
        code = "import sys; from telepathy.__main__ import main; sys.exit(main(sys.argv[1:]))"
        done = python_code(code, operation, str(save_dir), timeout=120, limit_memory=2 << 30)
        assert_no_traceback(done)
        assert done.code in (0, 1)
    assert_still_verified(run3[:2])


@pytest.mark.parametrize("field", ["reason", "hostname", "telepathy_version"])
def test_a_manifest_with_a_huge_string_field_is_listed_quickly(save_dir, run3, field):
    reseal(run3[-1], {field: "x" * (32 << 20)})
    started = time.monotonic()
    done = cli("list", str(save_dir), "--no-verify")
    status = cli("status", str(save_dir))
    assert done.code == 0 and status.code == 0 and "Traceback" not in done.text + status.text
    assert time.monotonic() - started < QUICK
    assert os.path.getsize(run3[-1] / "manifest.json") > 32 << 20
    assert json.loads((run3[-1] / "manifest.json").read_text())[field].startswith("x")
