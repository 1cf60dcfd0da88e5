"""Blob references read back: each blob once however many references name it, never two tensors that alias, and
never more bytes than the referencing tensor holds (a small compressed frame that inflates past it is refused)."""

from __future__ import annotations

import time

import pytest
import torch
import xxhash
import zstandard
from torch import nn

from telepathy import Checkpointer, TrainState
from telepathy.store.blobs import BLOB_KEY, BlobError, BlobStore

SIGNATURE = {"test": "blob references"}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zst"])
def test_references_to_one_blob_load_as_equal_tensors_that_do_not_alias(tmp_path, compress):
    torch.manual_seed(0)
    shared = torch.randn(256, 256).bfloat16() if compress else torch.randn(128, 128)
    state = {"a": shared, "b": shared.clone(), "zeros": [torch.zeros(64, 1024) for _ in range(3)], "c": shared}
    store, refs = BlobStore(tmp_path, compress=compress), {}
    skeleton = store.externalize(state, refs)
    assert len(refs) == 2  # one blob for the three equal tensors, one for the zeros
    assert {entry["codec"] for entry in refs.values()} == {"zst" if compress else "raw"}
    loaded = store.internalize(skeleton, refs)
    tensors = [loaded["a"], loaded["b"], loaded["c"], *loaded["zeros"]]
    assert all(torch.equal(x, y) for x, y in zip(tensors, [shared] * 3 + state["zeros"]))
    assert all(x.dtype == y.dtype and x.shape == y.shape for x, y in zip(tensors, [shared] * 3 + state["zeros"]))
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    loaded["b"].add_(1)  # an optimizer updating one tensor in place must leave the others as they were
    loaded["zeros"][1].fill_(7)
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["c"], shared)
    assert not loaded["zeros"][0].any() and not loaded["zeros"][2].any()


def compressed_blob(tmp_path, content_size: bool):
    """A blob that inflates to 64 MiB of zeros, referenced as a 128 x 128 float32 tensor (64 KiB)."""
    store = BlobStore(tmp_path)
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compressobj()
    frame = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(64)) + compressor.flush()
    name = xxhash.xxh3_128_hexdigest(bytes(64 << 10))
    path = store.path(name, "zst")
    path.parent.mkdir(parents=True)
    path.write_bytes(frame)
    refs = {name: {"codec": "zst", "bytes": len(frame), "stored_xxh3_128": xxhash.xxh3_128_hexdigest(frame)}}
    return store, {"w": {BLOB_KEY: name, "dtype": "torch.float32", "shape": [128, 128]}}, refs


@pytest.mark.parametrize("content_size", [True, False], ids=["says-its-size", "does-not-say"])
def test_a_compressed_blob_that_inflates_past_its_tensor_is_refused(tmp_path, content_size):
    store, skeleton, refs = compressed_blob(tmp_path, content_size)
    started = time.monotonic()
    with pytest.raises(BlobError, match="inflates to"):
        store.internalize(skeleton, refs)
    assert time.monotonic() - started < 1.0


def test_a_reference_that_disagrees_with_its_blob_is_refused_before_any_blob_is_read(tmp_path):
    store, refs = BlobStore(tmp_path), {}
    skeleton = store.externalize({"w": torch.randn(128, 128)}, refs)  # two saves: a pack each
    skeleton.update(store.externalize({"v": torch.randn(128, 128)}, refs))
    first, second = skeleton["w"][BLOB_KEY], skeleton["v"][BLOB_KEY]
    store.dir.blob_file(second, refs[second]).unlink()  # reading would fail differently: the check comes first
    for lie in ({"shape": [128, 256]}, {"dtype": "torch.float64"}, {"shape": [-128, -128]}, {"dtype": "object"}):
        with pytest.raises(BlobError, match="size|shape|dtype"):
            store.internalize({"w": {**skeleton["w"], **lie}, "v": skeleton["v"]}, refs)
    with pytest.raises(BlobError, match="not listed"):
        store.internalize({"w": {**skeleton["w"], BLOB_KEY: "0" * 32}}, refs)
    assert store.internalize({"w": skeleton["w"]}, {first: refs[first]})["w"].shape == (128, 128)


# ------------------------------------------------------------------------ resume with equal optimizer states
class Twins(nn.Module):
    """Two 128 x 128 layers (one blob each) that start equal and get equal gradients until step 2: their weights
    and AdamW states are then stored as one blob each, and must come back as separate tensors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(128, 128), nn.Linear(128, 128)
        self.b.load_state_dict(self.a.state_dict())


def train(model: Twins, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.ones(4, 128) if step <= 2 else torch.randn(4, 128, generator=torch.Generator().manual_seed(step))
        loss = model.a(x).square().mean() + model.b(x if step <= 2 else x.flip(0) * 2).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("fmt", ["differential", "compressed"])
def test_a_resume_from_equal_optimizer_states_stays_bit_identical(tmp_path, fmt):
    def make():
        model = Twins()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    reference, ref_opt = make()
    train(reference, ref_opt, range(1, 7))
    model, optimizer = make()
    train(model, optimizer, range(1, 3))
    with Checkpointer(tmp_path, parts={"model": model}, optimizer=optimizer, signature=SIGNATURE, format=fmt,
                      interval=None) as ckpt:  # fmt: skip
        saved = ckpt.save(TrainState(global_step=2, batch_idx=2), "interval")
    state = torch.load(saved / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    names = [s[k][BLOB_KEY] for s in state.values() for k in ("exp_avg", "exp_avg_sq") if isinstance(s[k], dict)]
    assert len(names) == 4 and len(set(names)) == 2  # the twins' states share blobs: the case under test
    resumed, resumed_opt = make()
    with Checkpointer(tmp_path, parts={"model": resumed}, optimizer=resumed_opt, signature=SIGNATURE, format=fmt,
                      interval=None) as ckpt:  # fmt: skip
        assert ckpt.resume().global_step == 2
    train(resumed, resumed_opt, range(3, 7))
    for (name, p), q in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for s, t in zip(ref_opt.state_dict()["state"].values(), resumed_opt.state_dict()["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in s)
