"""The checkpoint flags that every command-line trainer here shares (the main job and the spec's local test
tool), and the :class:`~telepathy.checkpointer.Checkpointer` options they become. No torch import: the
supervisor parses these flags before it starts the trainer."""

from __future__ import annotations

import argparse
from typing import Any


def add_checkpoint_flags(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group.add_argument("--keep_last", type=int, default=3, help="checkpoints kept (plus the best)")
    group.add_argument("--async_save", action="store_true", help="periodic/SIGUSR1 saves commit in the background")
    group.add_argument("--differential", action="store_true", help="write only tensors that changed (blobs/)")
    group.add_argument("--compress", action="store_true", help="zstd-compress tensors (implies blobs/)")
    group.add_argument("--resume_from", default=None, help="resume from this checkpoint directory (e.g. emergency)")
    group.add_argument("--strict_resume", action="store_true",
                       help="fail if the newest checkpoint is invalid instead of using an older one")  # fmt: skip


def checkpointer_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``Checkpointer`` from the flags above."""
    from telepathy.disk.retention import RetentionPolicy  # noqa: PLC0415

    return {
        "retention": RetentionPolicy(keep_last=args.keep_last),
        "async_save": args.async_save,
        "differential": args.differential,
        "compress": args.compress,
    }
