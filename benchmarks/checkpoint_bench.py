"""Checkpoint cost, measured side by side in one run: raw dd, torch.save, safetensors, torch.distributed.checkpoint
(save and async_save) and ours (sync and async). Prints medians and ratios; numbers depend on the disk.

    python benchmarks/checkpoint_bench.py                 # 100 MiB and 1 GiB states, 3 repeats
    python benchmarks/checkpoint_bench.py --sizes 4096 --repeats 1 --dir /scratch/bench
    python benchmarks/checkpoint_bench.py --smoke         # every section at a tiny size (a test runs this)

For each state size (fp32 tensors of 64 MiB and smaller, random values):
- write: "blocking" is how long a training loop would wait, "durable" until the bytes are fsynced and (ours)
  committed; GB/s over durable; x dd = durable time / the dd time for the same bytes (dd if=<random file>
  of=... bs=16M conv=fsync).
- load: into preallocated tensors (what load_state_dict does), in a fresh process each; "extra peak RSS" is
  the growth of the peak resident set during the load (mapped file pages count), over the state size. Page
  cache is dropped first when this machine allows it (root), else noted (never under --smoke).

The DCP rows run last in each repeat, inside a one-rank gloo process group that is destroyed right after:
with a process group alive, telepathy's Checkpointer counts as distributed (and refuses async saves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import usable_dir

CHUNK = 16 * 2**20  # elements per tensor: 64 MiB of fp32
SMOKE_CHUNK = 2**16  # --smoke: 256 KiB tensors, so a 1 MiB state has several (half of them can be frozen)


def shapes(mib: int, chunk: int = CHUNK) -> dict[str, int]:
    total, out, i = mib * 2**20 // 4, {}, 0
    while total > 0:
        out[f"layer{i}.weight"] = min(chunk, total)
        total, i = total - out[f"layer{i}.weight"], i + 1
    return out


def make_state(mib: int, chunk: int = CHUNK) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(n, generator=generator) for name, n in shapes(mib, chunk).items()}


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def write_methods(state, work: Path) -> dict[str, tuple[float, float]]:
    """name -> (blocking seconds, durable seconds), one run each."""
    import safetensors.torch

    from telepathy.checkpointer import Checkpointer
    from telepathy.store.checkpoint_store import CheckpointStore
    from telepathy.store.snapshot import HostBuffers
    from telepathy.train_state import TrainState

    results: dict[str, tuple[float, float]] = {}
    fresh = work / "out"

    def reset() -> None:
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir()

    reset()
    source = work / "random.bin"
    if not source.exists():
        with open(source, "wb") as f:
            for t in state.values():
                f.write(t.numpy().tobytes())
    dd = timed(lambda: subprocess.run(["dd", f"if={source}", f"of={fresh / 'dd.bin'}", "bs=16M", "conv=fsync"],
                                      check=True, capture_output=True))  # fmt: skip
    results["dd conv=fsync"] = (dd, dd)
    reset()

    def torch_save() -> None:
        torch.save(state, fresh / "state.pt")
        fsync_path(fresh / "state.pt")

    t = timed(torch_save)
    results["torch.save + fsync"] = (t, t)
    reset()

    def safetensors_save() -> None:
        safetensors.torch.save_file(state, fresh / "state.safetensors")
        fsync_path(fresh / "state.safetensors")

    t = timed(safetensors_save)
    results["safetensors + fsync"] = (t, t)
    reset()
    store = CheckpointStore(fresh / "ours")
    store.prepare()
    t = timed(lambda: store.save(1, {"model": state}, {"reason": "bench"}))
    results["ours sync"] = (t, t)
    store.close()
    reset()
    buffers = HostBuffers()
    buffers.snapshot(state)  # warm
    t = timed(lambda: buffers.snapshot(state))
    results["copy into warm buffers"] = (t, t)

    class Holder:
        def __init__(self) -> None:
            self.sd = state

        def state_dict(self):
            return self.sd

        def load_state_dict(self, sd):
            pass

    for label, changed in (("ours differential, all changed", 1.0), ("ours differential, half frozen", 0.5)):
        store = CheckpointStore(fresh / label.replace(" ", "_"), differential=True)
        store.prepare()
        store.save(1, {"model": state}, {"reason": "bench"})
        names = list(state)
        edited = {n: (t + 1 if i < max(1, int(len(names) * changed)) else t) for i, (n, t) in enumerate(state.items())}
        before = store.blobs.bytes_written
        t = timed(lambda edited=edited, store=store: store.save(2, {"model": edited}, {"reason": "bench"}))
        results[label] = (t, t)
        results[label + " (bytes)"] = (store.blobs.bytes_written - before, 0)
        store.close()
    store = CheckpointStore(fresh / "compressed", compress=True)
    store.prepare()
    t = timed(lambda: store.save(1, {"model": state}, {"reason": "bench"}))
    results["ours compressed"] = (t, t)
    results["ours compressed (bytes)"] = (store.blobs.bytes_written, 0)
    store.close()
    reset()
    ckpt = Checkpointer(fresh / "ours_async", parts={"model": Holder()}, async_save=True)
    ckpt.save(TrainState(global_step=1), "warm", blocking=False)  # allocate the buffers once
    ckpt.wait()
    started = time.perf_counter()
    ckpt.save(TrainState(global_step=2), "interval", blocking=False)
    blocking = time.perf_counter() - started
    ckpt.wait()
    results["ours async"] = (blocking, time.perf_counter() - started)
    ckpt.close()
    reset()
    results.update(dcp_methods(state, work, fresh))  # last: it needs a process group (see the module doc)
    reset()
    return results


def dcp_methods(state, work: Path, fresh: Path) -> dict[str, tuple[float, float]]:
    """DCP save and async_save in a one-rank gloo process group, destroyed before returning (when we made it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    results: dict[str, tuple[float, float]] = {}
    ours = not dist.is_initialized()
    if ours:  # a fresh rendezvous file each time: a FileStore's file is not for reuse after its group is gone
        rendezvous = Path(tempfile.mkdtemp(prefix="pg-", dir=work)) / "store"
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    try:
        t = timed(lambda: dcp.save(state, checkpoint_id=fresh / "dcp"))
        results["DCP save"] = (t, t)
        started = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=fresh / "dcp_async")
        blocking = time.perf_counter() - started
        future.result()
        results["DCP async_save"] = (blocking, time.perf_counter() - started)
    finally:
        if ours:
            dist.destroy_process_group()
            shutil.rmtree(rendezvous.parent, ignore_errors=True)
    return results


def peak_rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def load_child(method: str, path: str, mib: int, chunk: int) -> None:
    """In a fresh process: load ``path`` into preallocated tensors; print seconds and peak RSS."""
    from telepathy.disk.manifest import verify_directory
    from telepathy.store.checkpoint_store import CheckpointStore

    target = {k: torch.zeros(n) for k, n in shapes(mib, chunk).items()}  # resident, like a model's parameters
    Path("/proc/self/clear_refs").write_text("5\n")  # reset the peak RSS (VmHWM) to the current RSS (Linux)
    base_rss = peak_rss_kib()
    started = time.perf_counter()
    verify_s = 0.0
    if method == "torch.load":
        loaded = torch.load(path, weights_only=True)
    elif method == "ours":
        verify_s = timed(lambda: verify_directory(Path(path)))
        loaded = CheckpointStore.load_part(Path(path), "model")
    elif method == "ours, unverified":  # what verification adds: the same load without the hash pass
        loaded = CheckpointStore.load_part(Path(path), "model")
    else:  # dd read
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
        loaded = {}
    for k, v in loaded.items():
        target[k].copy_(v)
    seconds = time.perf_counter() - started
    peak = peak_rss_kib() - base_rss
    print(json.dumps({"seconds": seconds, "verify": verify_s, "extra_rss_mib": peak / 1024}))


def load_methods(state, work: Path, mib: int, chunk: int, drop: bool) -> tuple[dict[str, tuple[float, ...]], bool]:
    from telepathy.store.checkpoint_store import CheckpointStore

    paths = {"dd read": work / "random.bin", "torch.load": work / "load.pt"}
    torch.save(state, paths["torch.load"])
    store = CheckpointStore(work / "ours_load")
    store.prepare()
    paths["ours"] = paths["ours, unverified"] = store.save(1, {"model": state}, {"reason": "bench"})
    store.close()
    cold = drop
    out = {}
    for method, path in paths.items():
        cold = cold and drop_caches()
        child = [sys.executable, __file__, "--_load", method, str(path), str(mib), str(chunk)]
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        out[method] = (r["seconds"], r["verify"], r["extra_rss_mib"])
    return out, cold


def differential_table(mib: int, count: int, repeats: int, work: Path) -> None:
    """A dense differential save (every tensor changed, so every blob is new) against a full save of the same
    state of ``count`` tensors, alternated, each after ``sync`` and a pause so that neither inherits the other's
    write-back; medians and their ratio (the part of a differential save that is not the bytes: a file, an
    fsync and a rename per blob)."""
    from telepathy.store.checkpoint_store import CheckpointStore

    numel = mib * 2**20 // 4 // count
    generator = torch.Generator().manual_seed(1)
    stores = {"full": CheckpointStore(work / "full"), "differential": CheckpointStore(work / "diff", differential=True)}
    times: dict[str, list[float]] = {name: [] for name in stores}
    try:
        for store in stores.values():
            store.prepare()
        for r in range(repeats + 1):  # the first round warms up (directories, first blobs) and is not counted
            for name in list(stores) if r % 2 == 0 else list(stores)[::-1]:
                state = {f"layer{i}.weight": torch.randn(numel, generator=generator) for i in range(count)}
                os.sync()
                time.sleep(0.5)
                seconds = timed(lambda name=name, state=state, r=r: stores[name].save(r + 1, {"model": state}, {}))
                if r:
                    times[name].append(seconds)
    finally:
        for store in stores.values():
            store.close()
    full, diff = (statistics.median(times[n]) for n in ("full", "differential"))
    best_full, best_diff = (min(times[n]) for n in ("full", "differential"))
    print(f"\n| {mib} MiB in {count} tensors, every one changed ({repeats} alternated rounds) | median s | x full "
          f"| best s | x full |\n|---|---|---|---|---|\n| full save | {full:.3f} | 1.00 | {best_full:.3f} | 1.00 |\n"
          f"| dense differential save | {diff:.3f} | {diff / full:.2f} | {best_diff:.3f} | {best_diff / best_full:.2f} "
          "|\n(best: the fastest round of each, what the save costs when this VM's page cache does not stall a "
          "write; see the README)")  # fmt: skip


def compression_table(steps: int = 300) -> None:
    """Lossless ratio of our byte-plane zstd on synthetic (random normal) and trained weights, fp32 and bf16."""
    from telepathy.store import blobs as blob_store
    from telepathy.store.blobs import BlobStore

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):  # a short real training run: targets from a fixed random linear map
        x = torch.randn(64, 512)
        loss = (model(x) - x.roll(1, dims=1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    synthetic = {k: torch.randn_like(v) * v.std() for k, v in trained.items()}
    print("| compression (zstd level 3, byte planes) | fp32 ratio | bf16 ratio |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        trained_label = f"trained MLP, {steps} AdamW steps"
        for label, tensors in (("synthetic (random normal)", synthetic), (trained_label, trained)):
            ratios = []
            for dtype in (torch.float32, torch.bfloat16):
                store, refs = BlobStore(Path(tmp) / label[:5] / str(dtype), compress=True), {}
                cast = {k: v.to(dtype) for k, v in tensors.items()}
                store.externalize(cast, refs)
                sizes = [v.numel() * v.element_size() for v in cast.values()]
                raw = sum(n for n in sizes if n >= blob_store.MIN_BLOB_BYTES)  # the tensors that became blobs
                ratios.append(raw / sum(e["bytes"] for e in refs.values()))
            print(f"| {label} | {ratios[0]:.3f} | {ratios[1]:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="state sizes in MiB, comma-separated (default 100,1024)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per size; medians are shown (default 3)")
    parser.add_argument("--dir", type=Path, default=None, help="an existing directory to write in (default: /tmp)")
    parser.add_argument("--smoke", action="store_true",
                        help="every section at a tiny size (1 MiB in 256 KiB tensors, 2 repeats, 5 training steps): "
                        "checks that the script runs; the numbers mean little")  # fmt: skip
    parser.add_argument("--_load", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--compression_only", action="store_true", help="only the compression-ratio table")
    args = parser.parse_args()
    if args._load:
        load_child(args._load[0], args._load[1], int(args._load[2]), int(args._load[3]))
        return
    sizes = [int(s) for s in (args.sizes or ("1" if args.smoke else "100,1024")).split(",")]
    repeats = args.repeats or (2 if args.smoke else 3)
    chunk = SMOKE_CHUNK if args.smoke else CHUNK
    base = None if args.compression_only else usable_dir(args.dir, "checkpoint_bench")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.smoke:
        print("# --smoke: tiny sizes, so that the script cannot rot; the numbers mean little\n")
    compression_table(steps=5 if args.smoke else 300)
    if args.compression_only:
        return
    root = Path(tempfile.mkdtemp(prefix="telepathy-bench-", dir=base))
    try:
        for mib in sizes:
            state = make_state(mib, chunk)
            work = root / f"{mib}"
            work.mkdir()
            runs = [write_methods(state, work) for _ in range(repeats)]
            names = list(runs[0])
            med = {n: (statistics.median(r[n][0] for r in runs), statistics.median(r[n][1] for r in runs))
                   for n in names}  # fmt: skip
            dd, torch_save = med["dd conv=fsync"][1], med["torch.save + fsync"][1]
            gb = mib * 2**20 / 1e9
            print(f"\n## {mib} MiB state, {repeats} repeat(s), medians")
            print("| write | blocking s | durable s | GB/s | durable / dd | blocking / torch.save |")
            print("|---|---|---|---|---|---|")
            for n in names:
                b, d = med[n]
                if n.endswith("(bytes)"):
                    print(f"| {n} | {b / 2**20:.1f} MiB written | | | | {b / (mib * 2**20):.3f} of the state |")
                else:
                    print(f"| {n} | {b:.3f} | {d:.3f} | {gb / d:.2f} | {d / dd:.2f} | {b / torch_save:.3f} |")
            loads, cold = load_methods(state, work, mib, chunk, drop=not args.smoke)
            cache = "cold cache" if cold else f"page cache: {'not dropped' if args.smoke else 'could not drop it'}"
            print(f"\n| load ({cache}) | seconds | "
                  "verify s | extra peak RSS / state | x dd read |\n|---|---|---|---|---|")  # fmt: skip
            dd_read = loads["dd read"][0]
            for n, (s, v, rss) in loads.items():
                print(f"| {n} | {s:.3f} | {v:.3f} | {rss / mib:.2f} | {s / dd_read:.2f} |")
            added = loads["ours"][0] - loads["ours, unverified"][0]
            print(
                f"\nVerification adds {added:+.3f} s ({added / loads['ours'][0]:+.0%} of the verified load): its "
                "read is the load's disk read; the load then maps pages already in the page cache."
            )
            differential_table(mib, 8 if args.smoke else 200, repeats if args.smoke else max(repeats, 9), work)
            shutil.rmtree(work)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
