"""A small training run on a GPU for the ``cuda`` tests: the flags and output of ``telepathy.test_preemption`` (so
``harness.run_schedule`` drives it with real signals) plus where and how it computes.

    python tests/helpers/gpu_worker.py --save_dir D --epochs 3 --samples 96 --batch_size 8 --log_every 1 \\
        --device cuda [--amp bf16|fp16] [--num_workers 2 --pin_memory] [--backend nccl] [--async_save] ...

Every step draws from Python's ``random``, NumPy, the device's global generator (dropout, input noise) and a
registered ``torch.Generator`` on the device, so a resume that misses any of them changes the next loss. On CUDA
the run is deterministic only with ``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG``
set before cuBLAS starts; the worker refuses to run on CUDA without that variable (exit 2). ``--device cpu`` runs
the same code on the CPU, which is how the tests check this harness on a machine without a GPU. With ``--amp
fp16`` each step's loss token carries the GradScaler's scale and growth tracker, so the harness compares them at
every step too. ``--backend`` trains as one rank of a process group (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the
environment): NCCL on one GPU supports world size 1 only.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: this checkout's telepathy, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from telepathy import training_signals  # noqa: E402

training_signals.install_signal_handlers()  # before importing torch: a signal during start-up is kept

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from telepathy import rng  # noqa: E402
from telepathy.checkpointer import Checkpointer  # noqa: E402
from telepathy.data import ResumableBatchSampler, resumable_loader  # noqa: E402
from telepathy.errors import UsageError, run_program  # noqa: E402
from telepathy.options import CheckpointOptions, add_checkpoint_flags  # noqa: E402
from telepathy.test_preemption import SyntheticClassification  # noqa: E402
from telepathy.train_state import within_epoch  # noqa: E402

log = logging.getLogger("telepathy")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DIM, CLASSES = 16, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--save_dir", required=True)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the harness self-check)")
    p.add_argument("--amp", choices=["off", *AMP_DTYPES], default="off", help="autocast dtype (fp16: GradScaler)")
    p.add_argument("--init_scale", type=float, default=2.0**20, help="fp16: large, so that the scale backs off")
    p.add_argument("--growth_interval", type=int, default=3, help="fp16: short, so that the scale grows again")
    p.add_argument("--backend", choices=["none", "gloo", "nccl"], default="none")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--pin_memory", action="store_true", help="DataLoader(pin_memory=True), non-blocking uploads")
    p.add_argument("--step_delay", type=float, default=0.0)
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--negative_control",
        choices=["none", "rng", "cuda_rng", "scaler"],
        default="none",
        help="break one part of the resume (the RNGs, the CUDA RNGs only, the GradScaler): must differ",
    )
    add_checkpoint_flags(p, interval_flags=("--interval", "--checkpoint_interval"), interval_default=1000.0)
    return p.parse_args(argv)


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 256), nn.GELU(), nn.Dropout(0.2), nn.LayerNorm(256), nn.Linear(256, CLASSES))


def deterministic(device: torch.device) -> None:
    """What the README asks of a GPU run that must resume bit-identically."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} but torch.cuda.is_available() is False")
        if not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
            raise UsageError("set CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting (deterministic cuBLAS)")
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def train(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    deterministic(device)
    torch.set_num_threads(args.threads)
    rank = 0
    if args.backend != "none":
        from telepathy.distributed import init_from_environment  # noqa: PLC0415

        rank, _ = init_from_environment(args.backend)
    if args.negative_control == "rng":
        rng.restore_rng_state = lambda *a, **k: None
    elif args.negative_control == "cuda_rng":
        torch.cuda.set_rng_state_all = lambda *a, **k: None
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # also seeds every CUDA device
    dataset = SyntheticClassification(args.samples, DIM, CLASSES, args.seed)
    model = build_model().to(device)
    net = nn.parallel.DistributedDataParallel(model) if args.backend != "none" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.9)
    fp16 = args.amp == "fp16"
    scaler = torch.amp.GradScaler(device.type, init_scale=args.init_scale, growth_interval=args.growth_interval,
                                  enabled=fp16)  # fmt: skip
    noise = torch.Generator(device=device).manual_seed(args.seed + 1)  # a registered generator on the device
    batches = ResumableBatchSampler(args.samples, args.batch_size, seed=args.seed).batches_per_epoch
    signature = {"world_size": 1, "batch_size": args.batch_size, "grad_accum_steps": 1, "seed": args.seed,
                 "samples": args.samples, "amp": args.amp}  # fmt: skip
    kept_scaler = scaler if fp16 and args.negative_control != "scaler" else None
    ckpt = Checkpointer(args.save_dir, parts={"model": model}, optimizer=optimizer, scheduler=scheduler,
                        scaler=kept_scaler, generators={"noise": noise}, signature=signature, args=vars(args),
                        options=CheckpointOptions.from_args(args))  # fmt: skip
    state = ckpt.resume(args.resume_from, strict=args.strict_resume, check=within_epoch(batches))
    if rank == 0:
        print(f"PID {os.getpid()} training in {args.save_dir} on {device} from epoch {state.epoch} batch "
              f"{state.batch_idx} (global step {state.global_step})", flush=True)  # fmt: skip
    deadline = time.monotonic() + args.duration
    with ckpt.emergency_guard(state):
        while state.epoch < args.epochs:
            dataset.epoch = state.epoch
            loader = resumable_loader(dataset, args.batch_size, seed=args.seed, epoch=state.epoch,
                                      start_batch=state.batch_idx, num_workers=args.num_workers,
                                      pin_memory=args.pin_memory)  # fmt: skip
            for x, y in loader:
                loss = step(net, optimizer, scaler, noise, x, y, device, args.amp)
                scheduler.step()
                state.advance(batches)
                if rank == 0 and state.global_step % args.log_every == 0:
                    print(f"step {state.global_step} epoch {state.epoch} batch {state.batch_idx} loss "
                          f"{token(loss, scaler if fp16 else None)} ({loss:.4f})", flush=True)  # fmt: skip
                if args.step_delay:
                    time.sleep(args.step_delay)
                if ckpt.step_boundary(state, metric=loss):
                    code = training_signals.exit_code()
                    print(f"rank {rank}: checkpoint committed at step {state.global_step}; exiting {code}", flush=True)
                    return code
                if time.monotonic() >= deadline:
                    ckpt.save(state, "duration")
                    return training_signals.EXIT_COMPLETE
    ckpt.save(state, "final")
    print(f"training complete at step {state.global_step} (epoch {state.epoch})", flush=True)
    return training_signals.EXIT_COMPLETE


def step(net, optimizer, scaler, noise, x, y, device: torch.device, amp: str) -> float:
    """One step that draws from every generator: Python and NumPy on the host, the device's global generator
    (dropout, noise) and the registered device generator."""
    net.train()
    x = x.to(device, non_blocking=True)  # from pinned memory with --pin_memory: an asynchronous upload
    y = y.to(device, non_blocking=True)
    smoothing = 0.05 * random.random()
    mask = torch.from_numpy((np.random.rand(DIM) > 0.1).astype(np.float32)).to(device)
    x = x * mask + 0.01 * torch.randn(x.shape, device=device) + 0.01 * torch.randn(x.shape, device=device,
                                                                                    generator=noise)  # fmt: skip
    with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off"):
        loss = nn.functional.cross_entropy(net(x), y, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.item())


def token(loss: float, scaler: torch.amp.GradScaler | None) -> str:
    """The loss as ``float.hex``; with a GradScaler also its scale and growth tracker (one token, no spaces)."""
    if scaler is None:
        return loss.hex()
    state = scaler.state_dict()
    return f"{loss.hex()}/scale={float(state['scale']).hex()}/growth={state['_growth_tracker']}"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[telepathy] %(message)s", stream=sys.stdout)
    code = run_program(lambda: train(parse_args(argv)), log)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
