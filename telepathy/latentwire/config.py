"""Command-line flags of the main job, shared by the supervisor and the trainer it runs.

Both ``--flag_name`` and ``--flag-name`` are accepted; an unknown flag is an error with a suggestion."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from telepathy.options import (
    add_checkpoint_flags,
    add_supervisor_flags,
    non_negative_int,
    positive_float,
    positive_int,
    save_dir_problem,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m telepathy.preemptible_training",
        description="Preemption-safe LatentWire training under a supervising wrapper.",
        allow_abbrev=False,
    )
    add_supervisor_flags(p.add_argument_group("preemption"))
    add_checkpoint_flags(p.add_argument_group("checkpoints"))
    model = p.add_argument_group("LatentWire")
    model.add_argument("--llama_id", default=None, help="hub id or local path; default: tiny Llama from a config")
    model.add_argument("--qwen_id", default=None, help="optional second frozen LLM")
    model.add_argument("--latent_len", type=int, default=8)
    model.add_argument("--d_z", type=int, default=32)
    model.add_argument("--max_bytes", type=int, default=256)
    train = p.add_argument_group("training")  # this group and "LatentWire" configure the workload only
    train.add_argument("--samples", type=int, default=4000)
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--batch_size", type=int, default=8)
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--dataset", "--data_path", dest="data_path", default=None, help="SQuAD-format JSON file")
    train.add_argument("--num_workers", type=int, default=0)
    train.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    train.add_argument("--log_every", type=int, default=10, help="plain progress line every N steps (non-TTY)")
    train.add_argument("--step_delay", type=float, default=0.0, help="pause after each step (tests, demos)")
    return p


def normalize(argv: list[str]) -> list[str]:
    """``--flag-name`` -> ``--flag_name`` for every flag before a bare ``--``."""
    out = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + eq + value
        out.append(token)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(normalize(argv))
    if unknown:
        known = [opt for action in parser._actions for opt in action.option_strings]
        flag = unknown[0].split("=")[0]
        hint = difflib.get_close_matches(flag, known, n=1)
        parser.error(f"unknown flag {unknown[0]!r}" + (f"; did you mean {hint[0]}?" if hint else "; see --help"))
    checks = {
        "--samples": args.samples > 0, "--epochs": args.epochs > 0, "--batch_size": args.batch_size > 0,
        "--latent_len": args.latent_len > 0, "--d_z": args.d_z > 0, "--max_restarts": args.max_restarts >= 0,
        "--log_every": args.log_every > 0,
    }  # fmt: skip
    for flag, ok in checks.items():
        if not ok:
            parser.error(f"{flag} must be positive (got {getattr(args, flag[2:])})")
    problem = save_dir_problem(Path(args.save_dir))
    if problem:
        parser.error(problem)
    return args
