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

import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

if __package__ in (None, ""):  # run as a file path: make the package importable without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from telepathy.latentwire import config  # noqa: E402
from telepathy.supervisor import supervise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wrapped = argv[argv.index("--") + 1 :] if "--" in argv else None
    args = config.parse(argv[: argv.index("--")] if wrapped is not None else argv)
    if wrapped is not None and not wrapped:
        config.build_parser().error("nothing after '--': give the command to supervise")
    if wrapped and shutil.which(wrapped[0]) is None:
        config.build_parser().error(f"the command after '--' was not found: {wrapped[0]!r}")
    os.makedirs(args.save_dir, exist_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
