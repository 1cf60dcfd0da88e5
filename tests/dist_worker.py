"""A DDP run for the torchrun tests: rank 0 writes the checkpoints (replicated state), every rank agrees on
signals at each step boundary (``telepathy.distributed``).

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py SAVE_DIR STEPS STEP_DELAY
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from telepathy import training_signals
from telepathy.checkpointer import Checkpointer
from telepathy.distributed import agree_on_signals, follow_step_boundary
from telepathy.train_state import TrainState


def main() -> int:
    save_dir, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    training_signals.install_signal_handlers()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(save_dir, parts={"model": model.module}, optimizer=optimizer) if rank == 0 else None
    for _ in range(20):  # warm up the connections, then time the per-step agreement
        agree_on_signals(step=0)
    started = time.perf_counter()
    for _ in range(200):
        agree_on_signals(step=0)
    print(f"rank {rank} pid {os.getpid()} agree_us {(time.perf_counter() - started) / 200 * 1e6:.0f}", flush=True)
    state, data = TrainState(), torch.Generator().manual_seed(rank)
    for step in range(1, steps + 1):
        loss = model(torch.randn(4, 8, generator=data)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state.advance(steps)
        print(f"rank {rank} step {step}", flush=True)
        time.sleep(delay)
        if agree_on_signals(step=step):
            if ckpt is not None:
                stop = ckpt.step_boundary(state)
            else:  # not the writer (replicated state)
                stop = follow_step_boundary()
            if stop:
                dist.barrier()  # the writer's checkpoint is committed before anyone leaves
                print(f"rank {rank} exits {training_signals.exit_code()} at step {step}", flush=True)
                return training_signals.exit_code()
    return 0


if __name__ == "__main__":
    sys.exit(main())
