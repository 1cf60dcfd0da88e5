"""A small data-parallel run for the torchrun and srun tests: every rank calls ``Checkpointer.step_boundary``;
the ranks agree on signals, save together (rank 0 commits after every rank's files are durable) and stop together.

    torchrun --standalone --nproc_per_node=2 tests/helpers/dist_worker.py SAVE_DIR [--mode ddp|fsdp] [--out DIR] ...

The global batch (8 samples) is fixed and split across ranks, so a batch index means the same samples at any
world size. Prints ``rank R step S loss HEX samples I,J,..`` per step and ``rank R exits CODE at step S``;
with ``--out`` rank 0 writes the final full model state to ``DIR/final_model.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from telepathy import training_signals

training_signals.install_signal_handlers()  # before the heavy imports: a signal during them is not lost

import torch  # noqa: E402
from torch import nn  # noqa: E402

from telepathy.checkpointer import Checkpointer  # noqa: E402
from telepathy.data import ResumableBatchSampler  # noqa: E402
from telepathy.distributed import agree, init_from_environment  # noqa: E402
from telepathy.save_policy import Requests  # noqa: E402

GLOBAL_BATCH = 8


def build_model(mode: str, dropout: float) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(dropout), nn.ReLU(), nn.Linear(32, 2))
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model) if torch.distributed.is_initialized() else model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("save_dir")
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--interval", type=float, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--time_agreement", action="store_true")
    args = parser.parse_args()
    rank, world = init_from_environment("gloo")
    print(f"rank {rank} pid {os.getpid()} world {world}", flush=True)
    model = build_model(args.mode, args.dropout)
    torch.manual_seed(100 + rank)  # per-rank random streams (dropout): restored from rank_<r>.pt on resume
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    part = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    signature = {"global_batch": GLOBAL_BATCH, "samples": args.samples, "mode": args.mode}
    ckpt = Checkpointer(args.save_dir, parts={"model": part}, optimizer=optimizer, sharded=args.mode == "fsdp",
                        signature=signature)  # fmt: skip
    if args.time_agreement:
        for _ in range(20):  # warm up the connections, then time the per-step agreement
            agree(Requests())
        started = time.perf_counter()
        for _ in range(200):
            agree(Requests())
        print(f"rank {rank} agree_us {(time.perf_counter() - started) / 200 * 1e6:.0f}", flush=True)
    data = torch.Generator().manual_seed(7)
    inputs, targets = torch.randn(args.samples, 8, generator=data), torch.randn(args.samples, 2, generator=data)
    state = ckpt.resume()
    per_rank = GLOBAL_BATCH // world
    while state.epoch < args.epochs:
        sampler = ResumableBatchSampler(args.samples, GLOBAL_BATCH, seed=1, epoch=state.epoch,
                                        start_batch=state.batch_idx, drop_last=True)  # fmt: skip
        for batch in sampler:
            mine = batch[rank * per_rank : (rank + 1) * per_rank]
            loss = nn.functional.mse_loss(model(inputs[mine]), targets[mine])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.advance(sampler.batches_per_epoch)
            print(f"rank {rank} step {state.global_step} loss {loss.item().hex()} samples "
                  f"{','.join(map(str, mine))}", flush=True)  # fmt: skip
            time.sleep(args.delay)
            if ckpt.step_boundary(state, interval=args.interval):
                print(f"rank {rank} exits {training_signals.exit_code()} at step {state.global_step}", flush=True)
                return training_signals.exit_code()
    if args.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = part.state_dict()
    if rank == 0 and args.out:
        torch.save(full, os.path.join(args.out, "final_model.pt"))
    print(f"rank {rank} exits 0 at step {state.global_step}", flush=True)
    ckpt.close()
    return 0


if __name__ == "__main__":
    code = main()
    if torch.distributed.is_initialized():  # before the interpreter tears gloo's threads down (else: an abort, 134)
        torch.distributed.destroy_process_group()
    # Even so, one rank's teardown can abort ("terminate called without an active exception", exit 134) after its
    # checkpoint is committed and "exits 99" is printed, when the other rank's gloo goes first; srun then reports
    # 134 and the submit script does not requeue (seen once in ~20 CI runs). The README's advice, followed here:
    # nothing is left to run, so skip the C++ teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
