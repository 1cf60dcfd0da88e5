"""The main job: preemption-safe LatentWire training under a supervising wrapper.

    python -m telepathy.preemptible_training --checkpoint_interval 600 --grace_period 180 --auto_resume \\
        --save_dir runs/my_experiment --samples 10000 --epochs 10
    python -m telepathy.preemptible_training --save_dir D --grace_period 60 -- python my_train.py ...

The first form trains LatentWire (``telepathy.latentwire.train``) in a child process; the second supervises
any command (see :mod:`telepathy.child` for what the wrapper does for a command that does not use telepathy). Exit
codes: 0 complete, 99 preempted and saved (requeue), 98 stopped with nothing new saved, 130 after SIGINT, 129
after SIGHUP, 2/3/75 refusals, other codes are the trainer's failure.
"""

from __future__ import annotations

import signal

EARLY_SIGNALS: list[int] = []  # signals that arrive while the supervisor starts; it acts on them once it runs
if __name__ == "__main__":  # first, before the imports: a signal now must not kill the job by its default action
    for _signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(_signum, lambda signum, frame: EARLY_SIGNALS.append(signum))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a file path: make the package importable without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from telepathy.latentwire import config  # noqa: E402
from telepathy.options import DEFAULTS_ENV, SAVE_DIR_ENV, create_save_dir  # noqa: E402
from telepathy.supervisor import supervise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wrapped = argv[argv.index("--") + 1 :] if "--" in argv else None
    args = config.parse(argv[: argv.index("--")] if wrapped is not None else argv)
    if wrapped is not None and not wrapped:
        config.build_parser().error("nothing after '--': give the command to supervise")
    if wrapped and shutil.which(wrapped[0]) is None:
        config.build_parser().error(f"the command after '--' was not found: {wrapped[0]!r}")
    env_defaults = wrapped_defaults(args, config.build_parser()) if wrapped else {}
    os.environ.update(env_defaults)  # the command's Checkpointer takes the wrapper's flags as its defaults
    problem = create_save_dir(args.save_dir)  # a full disk, /proc, a read-only filesystem: before anything starts
    if problem:
        config.build_parser().error(problem)
    command = wrapped or [sys.executable, "-m", "telepathy.latentwire.train", *config.normalize(argv)]
    restart = command if wrapped or args.auto_resume else [*command, "--auto_resume"]  # a restart continues
    code = supervise(command, args.save_dir, args.grace_period, args.max_restarts, restart_command=restart,
                     restart_backoff=args.restart_backoff, early_signals=EARLY_SIGNALS)  # fmt: skip
    if wrapped is None and code == 0:
        from telepathy.disk.save_dir import SaveDir  # noqa: PLC0415

        latest, events = SaveDir(args.save_dir).latest, SaveDir(args.save_dir).events
        print(f"[telepathy] done: trained model parts (encoder.pt, adapter_*.pt) are in {latest}/, "
              f"the run's events in {events}", flush=True)  # fmt: skip
    return code


def wrapped_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """What the wrapper's explicit flags mean for a ``--`` command: checkpoint options and resume flags travel to
    its Checkpointer through the environment (:data:`telepathy.options.DEFAULTS_ENV`); flags of the LatentWire job
    cannot apply to another program and are refused, never ignored."""
    given = {a.dest for a in parser._actions if a.dest != "help" and getattr(args, a.dest) != a.default}
    options = {a.dest for group in parser._action_groups if group.title == "checkpoints" for a in group._group_actions}
    workload = {a.dest for group in parser._action_groups if group.title in ("LatentWire", "training")
                for a in group._group_actions}  # fmt: skip
    if given & workload:
        flags = ", ".join(f"--{name}" for name in sorted(given & workload))
        parser.error(f"{flags} configure the LatentWire job and do not reach a command after '--'; pass them to "
                     "your command instead")  # fmt: skip
    chosen = {name: getattr(args, name) for name in sorted(given & options)}
    env = {SAVE_DIR_ENV: str(Path(args.save_dir).resolve())}
    if chosen:
        env[DEFAULTS_ENV] = json.dumps(chosen)
    return env


if __name__ == "__main__":
    sys.exit(main())
