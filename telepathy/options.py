"""How a run checkpoints, as one dataclass with the defaults in one place, and the command-line flags generated
from it (no torch: the supervisor parses these flags before it starts the trainer).

    Checkpointer(save_dir, parts=..., options=CheckpointOptions(interval=300, keep_last=5, async_save=True))
    add_checkpoint_flags(parser)  ->  --checkpoint_interval --save_every_steps --keep_last --keep_every
                                      --format --async_save --agree_every (+ --differential/--compress aliases)
    CheckpointOptions.from_args(args)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telepathy.errors import UsageError

log = logging.getLogger("telepathy")

DEFAULTS_ENV = "TELEPATHY_CHECKPOINT_DEFAULTS"  # JSON: the wrapper's checkpoint flags for a command after '--'
SAVE_DIR_ENV = "TELEPATHY_SAVE_DIR"  # the save dir the wrapper watches (its lock probe, status, rescue)
_FLAG_FIELDS = {"checkpoint_interval": "interval", "save_every_steps": "every_steps", "keep_last": "keep_last",
                "keep_every": "keep_every", "format": "format", "async_save": "async_save",
                "agree_every": "agree_every", "snapshot_every_step": "snapshot_every_step"}  # fmt: skip
FORMATS = ("full", "differential", "compressed", "sharded")
FORMAT_HELP = ("full: each part one file; differential: tensors unchanged since a kept checkpoint are not written "
               "again (blobs/); compressed: differential + zstd; sharded: FSDP2/DTensor parts through "
               "torch.distributed.checkpoint")  # fmt: skip


@dataclass(frozen=True)
class CheckpointOptions:
    """What to save when, what to keep, in which format. Invalid values fail here, at construction."""

    interval: float | None = 600.0  # seconds between periodic saves; None: no saves by time
    every_steps: int | None = None  # also save every N optimizer steps (1: every step); None: not by count
    keep_last: int | None = 3  # newest checkpoints kept (None: all), plus the best and every keep_every-th step
    keep_best: bool = True
    keep_every: int | None = None
    higher_is_better: bool = False  # for keep_best: the metric passed to step_boundary/save
    format: str = "full"  # one of FORMATS
    async_save: bool = False  # periodic/SIGUSR1 saves block only for a copy to host memory
    agree_every: int = 1  # several ranks: agree on signals every k steps (telepathy.distributed)
    snapshot_every_step: bool = False  # copy each step's state to shared memory; the supervisor commits it if the
    # trainer dies without warning (SIGKILL, OOM, segfault): at most the step in flight is lost

    def __post_init__(self) -> None:
        from telepathy.save_policy import check_every_steps, check_interval  # noqa: PLC0415

        check_interval(self.interval)
        check_every_steps(self.every_steps)
        if self.format not in FORMATS:
            raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for name in ("keep_last", "keep_every", "agree_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.agree_every is None:
            raise UsageError("agree_every must be a whole number >= 1, got None")

    @property
    def uses_blobs(self) -> bool:
        return self.format in ("differential", "compressed")

    def retention(self) -> Any:
        """The :class:`~telepathy.disk.retention.RetentionPolicy` these options describe."""
        from telepathy.disk.retention import RetentionPolicy  # noqa: PLC0415

        return RetentionPolicy(self.keep_last, self.keep_best, self.keep_every, self.higher_is_better)

    def replace(self, **changes: Any) -> CheckpointOptions:
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(cls, options: CheckpointOptions | None, fields: dict[str, Any]) -> CheckpointOptions:
        """``options`` (or the defaults) with ``fields`` applied; also the older keyword forms:
        ``retention=RetentionPolicy(...)`` and the ``differential``/``compress``/``sharded`` booleans (formats)."""
        fields = dict(fields)
        retention = fields.pop("retention", None)
        if retention is not None:
            fields.update(keep_last=retention.keep_last, keep_best=retention.keep_best,
                          keep_every=retention.keep_every, higher_is_better=retention.higher_is_better)  # fmt: skip
        flagged = [name for name, key in (("sharded", "sharded"), ("compressed", "compress"),
                                          ("differential", "differential")) if fields.pop(key, False)]  # fmt: skip
        if flagged:
            fields.setdefault("format", flagged[0])
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown checkpoint option(s) {sorted(unknown)}; see telepathy.options.CheckpointOptions")
        wrapper = wrapper_defaults()
        if options is None:  # the wrapper's flags are the defaults; what the script sets itself wins, said aloud
            for name, value in wrapper.items():
                if name in fields and fields[name] != value:
                    log.warning("the wrapper asked for %s=%r but this script sets %s=%r; using the script's",
                                name, value, name, fields[name])  # fmt: skip
            return cls(**{**wrapper, **fields})
        differ = {k: v for k, v in wrapper.items() if getattr(options, k) != v}
        if differ:  # (only those that differ: the ones that agree are applied, and saying otherwise misleads)
            log.warning("the wrapper's checkpoint flags %s are overridden by the options this script passes (%s)",
                        differ, ", ".join(f"{k}={getattr(options, k)!r}" for k in differ))  # fmt: skip
        return options.replace(**fields)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CheckpointOptions:
        """The options the flags of :func:`add_checkpoint_flags` describe."""
        fmt = args.format
        if args.differential or args.compress:  # the older flags, still accepted
            wanted = "compressed" if args.compress else "differential"
            if fmt not in ("full", wanted):
                raise UsageError(f"--format {fmt} contradicts --{'compress' if args.compress else 'differential'}")
            fmt = wanted
        return cls(interval=args.checkpoint_interval, every_steps=args.save_every_steps, keep_last=args.keep_last,
                   keep_every=args.keep_every, format=fmt, async_save=args.async_save,
                   agree_every=args.agree_every, snapshot_every_step=args.snapshot_every_step)  # fmt: skip


def _wrapper_flags() -> dict[str, Any]:
    try:
        flags = json.loads(os.environ.get(DEFAULTS_ENV) or "{}")
    except ValueError:
        return {}
    return flags if isinstance(flags, dict) else {}


def wrapper_resume_flags() -> tuple[str | None, bool]:
    """``--resume_from`` and ``--strict_resume`` as given to a supervising wrapper (for its '--' command)."""
    flags = _wrapper_flags()
    return flags.get("resume_from"), bool(flags.get("strict_resume"))


def wrapper_defaults() -> dict[str, Any]:
    """The checkpoint options a supervising wrapper was given explicitly (for the command it runs after '--')."""
    flags = _wrapper_flags()
    merged = {_FLAG_FIELDS[k]: v for k, v in flags.items() if k in _FLAG_FIELDS}
    if flags.get("differential") or flags.get("compress"):
        merged.setdefault("format", "compressed" if flags.get("compress") else "differential")
    return merged


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def at_most(parse: Any, limit: float, said: str) -> Any:
    """``parse`` with an upper bound: a value no run could mean (1e308 seconds) refused at parse time, not met as a
    crash at the first restart."""

    def parse_bounded(text: str) -> float:
        value = parse(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit:g} ({said}), got {text!r}")
        return value

    return parse_bounded


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def path_text(text: str) -> str:
    """A path argument as given; an empty one is refused (it would silently mean the current directory), and
    so is one torch cannot open (:func:`unreadable_by_torch`)."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"must name a path, got {text!r}")
    problem = unreadable_by_torch(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def unreadable_by_torch(path: str | os.PathLike) -> str | None:
    """Why torch could not load checkpoints under ``path``, or None: a name with bytes that are not UTF-8 saves
    fine but ``torch.load`` cannot open it, so every checkpoint there would be written and never resumed."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return (f"{shown} is not a valid UTF-8 path: torch cannot load checkpoints from it (saves would be written "
                "and never resumed); rename it or pick another")  # fmt: skip
    return None


def existing_directory(text: str) -> str:
    """A path argument naming a directory that exists now (``--resume_from``)."""
    problem = path_problem(Path(path_text(text)), directory=True)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def existing_file(text: str) -> str:
    """A path argument naming a regular file that exists now (a data set)."""
    problem = path_problem(Path(path_text(text)), directory=False)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def path_problem(path: Path, directory: bool) -> str | None:
    """Why ``path`` is not an existing directory (``directory``) or regular file, in a few words; None when it
    is one. Never raises: a name too long, a file in the middle of the path or /proc are answers too."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{path} does not exist"
    except NotADirectoryError:
        return f"{path} does not exist (a part of the path is a file)"
    except OSError as exc:
        return f"{path} cannot be used: {exc.strerror or exc}"
    if directory and not stat.S_ISDIR(mode):
        return f"{path} is not a directory"
    if not directory and not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    return None


def add_checkpoint_flags(group: Any, *, interval_flags: tuple[str, ...] = ("--checkpoint_interval",),
                         interval_default: float = CheckpointOptions.interval) -> None:  # fmt: skip
    """The flags of :class:`CheckpointOptions` (the defaults are the dataclass's) and the resume flags.
    ``interval_flags``: the spec's main job says ``--checkpoint_interval``, its local test tool ``--interval``."""
    d = CheckpointOptions()
    group.add_argument(*interval_flags, dest="checkpoint_interval", type=positive_float, default=interval_default,
                       help="seconds between periodic checkpoints")  # fmt: skip
    group.add_argument("--save_every_steps", type=positive_int, default=d.every_steps,
                       help="also checkpoint every N optimizer steps (1: every step)")  # fmt: skip
    group.add_argument("--keep_last", type=positive_int, default=d.keep_last, help="checkpoints kept (plus the best)")
    group.add_argument("--keep_every", type=positive_int, default=d.keep_every, help="also keep every K-th step")
    group.add_argument("--format", choices=FORMATS, default=d.format, help=FORMAT_HELP)
    group.add_argument("--differential", action="store_true", help="same as --format differential")
    group.add_argument("--compress", action="store_true", help="same as --format compressed")
    group.add_argument("--async_save", action="store_true", help="periodic/SIGUSR1 saves commit in the background")
    group.add_argument("--snapshot_every_step", action="store_true",
                       help="copy each step's state to shared memory; if the trainer is killed without warning "
                       "(SIGKILL, OOM) the supervisor commits it: at most the step in flight is lost")  # fmt: skip
    group.add_argument("--agree_every", type=positive_int, default=d.agree_every,
                       help="several ranks: agree on signals every K steps")  # fmt: skip
    group.add_argument("--resume_from", type=existing_directory, default=None,
                       help="resume from this checkpoint directory (e.g. emergency)")  # fmt: skip
    group.add_argument("--strict_resume", action="store_true",
                       help="fail if the newest checkpoint is invalid instead of using an older one")  # fmt: skip


def add_supervisor_flags(group: Any) -> None:
    """The flags of the supervising wrapper (any trainer): where, how long to wait after SIGTERM, restarts."""
    group.add_argument("--save_dir", type=path_text, default="runs/preemptible_exp")
    group.add_argument("--grace_period", type=at_most(positive_float, 7 * 86400, "a week"), default=120.0,
                       help="seconds the trainer gets after SIGTERM")  # fmt: skip
    group.add_argument("--auto_resume", action="store_true", help="resume from SAVE_DIR/latest when present")
    group.add_argument(
        "--max_restarts",
        type=non_negative_int,
        default=2,
        help="restarts after trainer failures in a row (one that made progress resets the count)",
    )
    group.add_argument("--restart_backoff", type=at_most(positive_float, 3600, "an hour"), default=2.0,
                       help="seconds before the first restart (doubled for each failure in a row)")  # fmt: skip


def save_dir_problem(save_dir: Path) -> str | None:
    """Why ``save_dir`` cannot be used, checked before any training starts; None when it can."""
    try:
        if save_dir.exists() and not save_dir.is_dir():
            return f"--save_dir {save_dir} exists and is not a directory; pick another path"
        existing = save_dir
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:  # a name too long, a file in the middle of the path
        return f"--save_dir {save_dir} cannot be used ({exc.strerror or exc}); pick another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--save_dir {save_dir} is not writable ({existing} does not allow this user to create files)"
    return None


def create_save_dir(save_dir: str | os.PathLike) -> str | None:
    """Create ``save_dir`` before training starts (what the checks above cannot see, e.g. /proc as root); why it
    cannot be created, in one line, or None."""
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as exc:  # a full disk, /proc, a read-only filesystem
        return f"cannot create --save_dir {save_dir}: {exc.strerror or exc}"
    return None
