"""Command-line flags of the main job, shared by the supervisor and the trainer it runs.

Both ``--flag_name`` and ``--flag-name`` are accepted; an unknown flag is an error with a suggestion."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

from telepathy.options import (
    add_checkpoint_flags,
    add_supervisor_flags,
    existing_directory,
    existing_file,
    non_negative_float,
    non_negative_int,
    path_text,
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
    model.add_argument("--llama_id", type=model_id, default=None,
                       help="hub id or local path; default: tiny Llama from a config")  # fmt: skip
    model.add_argument("--qwen_id", type=model_id, default=None, help="optional second frozen LLM")
    model.add_argument("--latent_len", type=positive_int, default=8)
    model.add_argument("--d_z", type=positive_int, default=32)
    model.add_argument("--max_bytes", type=positive_int, default=256)
    train = p.add_argument_group("training")  # this group and "LatentWire" configure the workload only
    train.add_argument("--samples", type=positive_int, default=4000)
    train.add_argument("--epochs", type=positive_int, default=2)
    train.add_argument("--batch_size", type=positive_int, default=8)
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--dataset", "--data_path", dest="data_path", type=existing_file, default=None,
                       help="SQuAD-format JSON file")  # fmt: skip
    train.add_argument("--num_workers", type=non_negative_int, default=0)
    train.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    train.add_argument("--device", type=device_name, default="cpu",
                       help="cpu (default), cuda or cuda:N (with deterministic algorithms)")  # fmt: skip
    train.add_argument("--log_every", type=positive_int, default=10,
                       help="plain progress line every N steps (non-TTY)")  # fmt: skip
    train.add_argument("--step_delay", type=non_negative_float, default=0.0,
                       help="pause after each step (tests, demos)")  # fmt: skip
    return p


def model_id(text: str) -> str:
    """``--llama_id``/``--qwen_id``: a Hugging Face hub id (``org/name``, checked when it is downloaded) or a
    local model directory, which must exist now (a hub id never starts with / or . nor has two /)."""
    if path_text(text).startswith(("/", ".")) or text.count("/") > 1:
        existing_directory(text)
    return text


def device_name(text: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (checked against the visible GPUs when training starts)."""
    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


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
    problem = save_dir_problem(Path(args.save_dir))
    if problem:
        parser.error(problem)
    return args
