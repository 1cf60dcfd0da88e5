"""Ranks that agree: every rank of a ``torch.distributed`` job acts on a signal at the same step, and the
few collectives the checkpointer needs (who am I, broadcast from rank 0, gather to rank 0).

A signal may reach one rank, some or all (SLURM's ``B:`` signals only the batch host; a preemption signals every
task), and interval clocks drift apart. If ranks decided alone, one would stop or save while the others wait in
a collective for it forever. So at each step boundary every rank contributes what it would act on —
[a signal asked for a save, the interval is due, the exit signal] — to one all-reduce (MAX) of three integers,
and the save policy (:mod:`telepathy.save_policy`) decides on the result, the same on every rank. Outside a process
group all of this is a no-op, so the same loop runs with and without ``torchrun``.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
from typing import Any

import torch
import torch.distributed as dist

from telepathy.save_policy import Requests


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object between our own processes)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(value: Any) -> list[Any] | None:
    """Every rank's ``value``, as a list on rank 0 (None on the other ranks)."""
    if not is_distributed():
        return [value]
    rank, world = rank_and_world_size()
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def agree(requests: Requests, group: object = None) -> Requests:
    """Every rank's requests combined (one all-reduce MAX of three integers): a save or a stop asked on any rank
    is asked on all. Call on every rank at the same step; outside a process group it returns ``requests``."""
    if not is_distributed():
        return requests
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    flags = torch.tensor(requests.as_ints(), dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return Requests.from_ints(flags.tolist())


def steps_between_agreements(grace_period: float, step_seconds: float, save_seconds: float,
                              agreement_seconds: float = 0.002, max_overhead: float = 0.01) -> int:  # fmt: skip
    """The ``agree_every`` k for a run: as small as keeps the agreement under ``max_overhead`` of the step time
    (1 when a step is long), but never so large that a signal waiting k steps plus a save overruns half the
    grace period. Raises ValueError when even k=1 does not fit (the grace period is too short for a save)."""
    budget = grace_period / 2 - save_seconds
    if budget < step_seconds:
        raise ValueError(f"a grace period of {grace_period:.0f} s leaves no time for a {save_seconds:.0f} s save after "
                         f"a {step_seconds:.2f} s step; ask the scheduler for a longer warning")  # fmt: skip
    wanted = math.ceil(agreement_seconds / (max_overhead * step_seconds))
    return max(1, min(wanted, int(budget / step_seconds + 1e-9)))  # + epsilon: 0.5 / 0.01 is 49.999…


def init_from_environment(backend: str | None = None) -> tuple[int, int]:
    """``dist.init_process_group`` under ``torchrun`` (RANK/WORLD_SIZE/MASTER_ADDR set) or under ``srun`` with
    several tasks (derived from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the first host of the job's node list
    as the rendezvous host, a port derived from the job id); a single process stays undistributed.
    Returns (rank, world size)."""
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_host(env.get("SLURM_JOB_NODELIST") or socket.gethostname()))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1 and "MASTER_ADDR" not in env:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return rank_and_world_size()


def _first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (``node[01-04]`` → ``node01``), via ``scontrol``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0]
