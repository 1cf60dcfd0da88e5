"""The LatentWire trainer: the child process the main job supervises (``python -m telepathy.latentwire.train``).

It trains the encoder and adapters against frozen LLMs with every guarantee of the core engine: flag-based
signals, checkpoints at step boundaries, exact resume. Its Checkpointer records the run's events (and so each
commit) in ``SAVE_DIR/events.jsonl`` and reports them to the supervisor (``telepathy.disk.events``).
"""

# ruff: noqa: E402  (the handlers go in before the slow imports)
from __future__ import annotations

from telepathy import training_signals

if __name__ == "__main__":  # first: a SIGTERM during the seconds of importing torch must not kill the trainer
    training_signals.install_signal_handlers()

import functools
import logging
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn

from telepathy.checkpointer import Checkpointer
from telepathy.data import ResumableBatchSampler, resumable_loader
from telepathy.errors import UsageError, run_program
from telepathy.latentwire import config
from telepathy.latentwire.llm import FrozenLM, load_frozen_lm
from telepathy.latentwire.model import Adapter, ByteEncoder
from telepathy.latentwire.qa_data import QADataset, collate, prompt_bytes, squad_qa, synthetic_qa
from telepathy.options import CheckpointOptions
from telepathy.train_state import TrainState, within_epoch

log = logging.getLogger("telepathy")
ANCHOR = "Answer: "


def answer_loss(lm: FrozenLM, adapter: Adapter, z: torch.Tensor, answers: list[str]) -> torch.Tensor:
    """Teacher-forced cross-entropy of each answer given [latent prefix, "Answer: " anchor]."""
    tok = lm.tokenizer
    anchor = tok(ANCHOR, add_special_tokens=False)["input_ids"]
    targets = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
    width = len(anchor) + max(len(t) for t in targets)
    batch, latent = z.shape[0], z.shape[1]
    ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((batch, latent + width), -100, dtype=torch.long)
    mask = torch.zeros((batch, latent + width), dtype=torch.long)
    for row, target in enumerate(targets):
        seq = anchor + target
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, latent + len(anchor) : latent + len(seq)] = torch.tensor(target)
        mask[row, : latent + len(seq)] = 1
    ids, labels, mask = ids.to(z.device), labels.to(z.device), mask.to(z.device)
    embeds = torch.cat([adapter(z), lm.model.get_input_embeddings()(ids)], dim=1)
    return lm.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def crash_point(step: int) -> None:
    """Test hook: ``TELEPATHY_TEST_CRASH_ONCE=<marker file>:<step>`` raises once at that step (creating the marker
    records that it did), so tests can prove crash -> emergency checkpoint -> restart -> completion."""
    spec = os.environ.get("TELEPATHY_TEST_CRASH_ONCE")
    if spec:
        marker, _, at = spec.rpartition(":")
        if step == int(at) and not os.path.exists(marker):
            open(marker, "x").close()
            raise RuntimeError(f"injected crash at step {step} (TELEPATHY_TEST_CRASH_ONCE)")


def progress(args, total_steps: int):
    """A tqdm bar on a terminal; None (plain log lines) when stdout is a file, e.g. a SLURM log."""
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total_steps, unit="step", dynamic_ncols=True)


def training_device(name: str) -> torch.device:
    """``--device``; on CUDA also what a bit-identical resume needs there: deterministic algorithms, and cuBLAS's
    workspace fixed before its first call."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: no such CUDA device is visible (torch sees "
                             f"{torch.cuda.device_count()}); use --device cpu or another index")  # fmt: skip
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return device


def train(args) -> int:
    if not training_signals.installed():  # a request that arrived during start-up stays pending
        training_signals.install_signal_handlers()
    torch.set_num_threads(args.threads)
    device = training_device(args.device)
    items = squad_qa(args.data_path, args.samples) if args.data_path else synthetic_qa(args.samples, args.seed)
    dataset = QADataset(items)
    lms = {"llama": load_frozen_lm(args.llama_id)}
    if args.qwen_id:
        lms["qwen"] = load_frozen_lm(args.qwen_id)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    encoder = ByteEncoder(args.latent_len, args.d_z, max_bytes=args.max_bytes)
    adapters = {name: Adapter(args.d_z, lm.model.config.hidden_size, lm.embed_rms) for name, lm in lms.items()}
    trainable = nn.ModuleList([encoder, *adapters.values()]).to(device)  # built on the CPU: the same initial weights
    for lm in lms.values():
        lm.model.to(device)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=args.lr)
    batches = ResumableBatchSampler(len(dataset), args.batch_size, seed=args.seed).batches_per_epoch
    signature = {
        "world_size": 1, "batch_size": args.batch_size, "grad_accum_steps": 1, "seed": args.seed,
        "samples": len(dataset), "latent_len": args.latent_len, "d_z": args.d_z, "data_path": args.data_path,
        **{f"llm_{name}": f"{lm.identity} fingerprint={lm.fingerprint}" for name, lm in lms.items()},
        **({"device": device.type} if device.type != "cpu" else {}),  # CPU checkpoints from before the flag still fit
    }  # fmt: skip
    ckpt = Checkpointer(
        args.save_dir,
        parts={"encoder": encoder, **{f"adapter_{name}": a for name, a in adapters.items()}},
        optimizer=optimizer,
        signature=signature,
        args=vars(args),
        options=CheckpointOptions.from_args(args),
    )
    resuming = args.auto_resume or args.resume_from
    state = (
        ckpt.resume(args.resume_from, strict=args.strict_resume, check=within_epoch(batches))
        if resuming
        else TrainState()
    )
    if not (args.auto_resume or args.resume_from) and ckpt.store.committed():
        log.error("%s already holds checkpoints; pass --auto_resume to continue it or use a new --save_dir",
                  args.save_dir)  # fmt: skip
        return 2
    total = args.epochs * batches
    if state.epoch >= args.epochs:
        print(f"training already complete at step {state.global_step}; nothing to do", flush=True)
        return training_signals.EXIT_COMPLETE
    bar = progress(args, total)
    if bar is not None:
        bar.update(state.global_step)
    say = bar.write if bar is not None else functools.partial(print, flush=True)  # a line that keeps the bar intact

    started, seen = time.monotonic(), 0
    with ckpt.emergency_guard(state):
        while state.epoch < args.epochs:
            loader = resumable_loader(dataset, args.batch_size, seed=args.seed, epoch=state.epoch,
                                      start_batch=state.batch_idx, num_workers=args.num_workers,
                                      collate_fn=collate)  # fmt: skip
            epoch_losses: list[float] = []
            for batch in loader:
                trainable.train()
                z = encoder(prompt_bytes(batch, args.max_bytes).to(device))
                answers = [item["answer"] for item in batch]
                loss = sum(answer_loss(lm, adapters[name], z, answers) for name, lm in lms.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.item())
                epoch_losses.append(value)
                state.advance(batches)
                state.best_loss = min(state.best_loss, value)
                seen += len(batch)
                rate = seen / max(time.monotonic() - started, 1e-9)
                if bar is not None:
                    bar.set_postfix(epoch=state.epoch, loss=f"{value:.4f}", samples_s=f"{rate:.1f}")
                    bar.update(1)
                elif state.global_step % args.log_every == 0 or state.global_step == total:
                    eta = (total - state.global_step) * args.batch_size / max(rate, 1e-9)
                    print(f"step {state.global_step}/{total} epoch {state.epoch} loss {value.hex()} ({value:.4f}) "
                          f"{rate:.1f} samples/s eta {eta:.0f}s", flush=True)  # fmt: skip
                if state.batch_idx == 0:  # the epoch just ended
                    mean = sum(epoch_losses) / len(epoch_losses)
                    say(f"epoch {state.epoch}/{args.epochs} done: mean loss {mean:.4f} over the "
                        f"{len(epoch_losses)} steps this process ran")  # fmt: skip
                if args.step_delay:
                    time.sleep(args.step_delay)
                crash_point(state.global_step)
                if ckpt.step_boundary(state, metric=value):
                    return training_signals.exit_code()
    ckpt.save(state, "final", state.best_loss)
    if bar is not None:
        bar.close()
    print(f"training complete: step {state.global_step}, best loss {state.best_loss:.4f}", flush=True)
    return training_signals.EXIT_COMPLETE


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[telepathy] %(message)s", stream=sys.stdout)
    code = run_program(lambda: train(config.parse(sys.argv[1:] if argv is None else argv)), log)
    sys.exit(code)


if __name__ == "__main__":
    main()
