"""Ranks that agree: every rank of a ``torch.distributed`` job acts on a signal at the same step.

A signal may reach one rank, some or all (SLURM's ``B:`` signals only the batch host; a preemption signals every
task), and interval clocks drift apart. If ranks decided alone, one would stop or save while the others wait in
a collective for it forever. So at each step boundary every rank contributes what it would act on —
[a signal asked for a save, the interval is due, the exit signal] — to one all-reduce (MAX) of three integers,
and adopts the result; then ``Checkpointer.step_boundary`` decides the same on every rank. Outside a process
group this is a no-op, so the same loop runs with and without ``torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from telepathy import training_signals


def agree_on_signals(interval: float | None = None, *, step: int, every: int = 1, group: object = None) -> bool:
    """Call on every rank after each optimizer step; returns True on the steps where the ranks agreed, and
    only then may the loop call ``step_boundary`` (so no rank acts alone on a local signal). ``every``: agree
    every k-th ``step`` only (a signal then waits up to k steps; keep k steps well inside the grace period)."""
    if step % every:
        return False
    if dist.is_available() and dist.is_initialized():
        save, due, exit_signum = training_signals.pending_requests(interval)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        flags = torch.tensor([int(save), int(due), exit_signum], dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        training_signals.adopt_requests(bool(flags[0]), bool(flags[1]), int(flags[2]))
    return True


def follow_step_boundary(interval: float | None = None) -> bool:
    """``step_boundary`` for ranks that do not write (replicated state): consume the agreed save request and
    restart the interval clock like the writer does, so no rank reports "due" again at the next step; returns
    True when the run must stop."""
    if training_signals.should_save_checkpoint(interval):
        training_signals.mark_checkpoint_saved()
    return training_signals.should_exit_training()
