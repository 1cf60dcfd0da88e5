"""A nanoGPT-style training loop ported to telepathy: iterations, not epochs; random batches drawn with the global
torch RNG; the next batch prefetched inside the step; dropout. Everything live at a step boundary is in the
checkpoint: the weights and optimizer (parts), the RNG states (saved by the Checkpointer), and the prefetched batch
(``state.extra``). Try it, then check the port:

    python examples/nanogpt_loop.py --save_dir runs/nano --iters 60
    python -m telepathy check-resume --sigterm_at 20 --sigkill_at 40 -- \\
        python examples/nanogpt_loop.py --save_dir {save_dir} --iters 60

``--bug prefetch`` leaves the prefetched batch out of the checkpoint, ``--bug rng`` re-seeds after a resume: the
mistakes a port makes, which check-resume catches at the first step after the resume.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from telepathy import Checkpointer, training_signals

VOCAB, BLOCK, BATCH = 64, 16, 8


def main() -> int:
    training_signals.install_signal_handlers()  # first: a signal during start-up is acted on, not fatal
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_dir", required=True)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--bug", choices=["none", "prefetch", "rng"], default="none")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1337)
    data = torch.randint(0, VOCAB, (20_000,), generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Embedding(VOCAB, 32), nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - BLOCK - 1, (BATCH,))
        return torch.stack([data[i : i + BLOCK] for i in ix]), torch.stack([data[i + 1 : i + 1 + BLOCK] for i in ix])

    ckpt = Checkpointer(args.save_dir, parts={"model": model}, optimizer=optimizer, every_steps=10, interval=None)
    state = ckpt.resume()
    if state.global_step >= args.iters:
        print(f"already done at iteration {state.global_step}; nothing to do", flush=True)
        return 0
    if args.bug == "rng" and state.global_step:
        torch.manual_seed(1337)  # the mistake: re-seeding after the resume throws the restored RNG state away
    if "batch" in state.extra and args.bug != "prefetch":
        x, y = state.extra["batch"]  # the batch prefetched before the checkpoint
    else:
        x, y = get_batch()
    while state.global_step < args.iters:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.view(-1, VOCAB), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        x, y = get_batch()  # prefetch the next batch while "the GPU works"
        state.advance()
        state.extra["batch"] = (x, y)  # live at the step boundary: it goes in the checkpoint
        print(f"iter {state.global_step} loss {loss.item():.4f}", flush=True)
        if ckpt.step_boundary(state, metric=loss.item()):
            return training_signals.exit_code()
    ckpt.save(state, "final")
    ckpt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
