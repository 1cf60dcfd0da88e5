"""``python -m telepathy <verb> SAVE_DIR`` (also the ``telepathy`` command): tools for the person running jobs.

    status SAVE_DIR... [--json]            running/preempted/complete/failed, position, latest checkpoint, ...
                                           (several save dirs: one line each, e.g. `telepathy status runs/*`)
    list SAVE_DIR [--json] [--no-verify]   every checkpoint: step, time, size, reason, verified
    verify PATH [--load]                   one checkpoint or all, against their manifests
    prune SAVE_DIR [--keep_last N] [--keep_every K] [--no-keep_best] [--dry-run]
    plot SAVE_DIR [--out FILE]             loss vs step with preemptions and checkpoints; throughput
    export SAVE_DIR [--checkpoint DIR] [--out DIR]   the trained parts as safetensors
    check-resume [--sigterm_at K] [--sigkill_at K] -- COMMAND ... {save_dir} ...
                                           does this training command resume bit-identically? (runs it 3 times)

Exit codes: 0 done, 1 something failed (verify), 2 the path is not a telepathy save dir or a usage error,
75 prune refused because a live run writes there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from telepathy.errors import EXIT_SAVE_DIR_BUSY, EXIT_USAGE
from telepathy.options import path_problem, path_text, positive_int


def _path(text: str) -> Path:
    """A path argument; an empty one is refused (``Path("")`` would silently mean the current directory)."""
    return Path(path_text(text))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telepathy", description="Inspect and maintain telepathy save dirs.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    status = verbs.add_parser("status", help="the run's state, position, latest checkpoint, preemptions")
    status.add_argument("save_dir", type=_path, nargs="+", help="one save dir (details) or several (a table)")
    status.add_argument("--json", action="store_true")
    listing = verbs.add_parser("list", help="checkpoints with step, time, size, reason, verified")
    listing.add_argument("save_dir", type=_path)
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--no-verify", dest="verify", action="store_false", help="skip hashing the files")
    verify = verbs.add_parser("verify", help="check checkpoints against their manifests; exit 1 on any failure")
    verify.add_argument("path", type=_path, help="a save dir or one checkpoint directory")
    verify.add_argument("--load", action="store_true", help="also load every file with weights_only=True")
    prune = verbs.add_parser("prune", help="apply a retention policy now")
    prune.add_argument("save_dir", type=_path)
    prune.add_argument("--keep_last", "--keep-last", type=positive_int, default=3)
    prune.add_argument("--keep_every", "--keep-every", type=positive_int, default=None)
    prune.add_argument("--no-keep_best", "--no-keep-best", dest="keep_best", action="store_false")
    prune.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="only say what would go")
    plot = verbs.add_parser("plot", help="PNG: loss vs step with preemptions and checkpoints; throughput")
    plot.add_argument("save_dir", type=_path)
    plot.add_argument("--out", type=_path, default=None, help="[SAVE_DIR/run.png]")
    export = verbs.add_parser("export", help="write the trained parts as safetensors")
    export.add_argument("save_dir", type=_path)
    export.add_argument("--checkpoint", type=_path, default=None, help="[the newest valid checkpoint]")
    export.add_argument("--out", type=_path, default=None, help="[SAVE_DIR/export/step_N]")
    return parser


def not_a_save_dir(path: Path) -> str | None:
    """One line saying why ``path`` is not a telepathy save dir, or None when it is one."""
    problem = path_problem(path, directory=True)
    if problem is not None:
        return problem
    from telepathy.disk.save_dir import SaveDir  # noqa: PLC0415

    try:
        if not SaveDir(path).looks_like_save_dir():
            return f"{path} is not a telepathy save dir (no checkpoints/, latest or events.jsonl)"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-resume"]:  # its own flags, then a whole command after '--'
        from telepathy.tools import check_resume

        return check_resume.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.verb == "verify":
        from telepathy.tools.verify import verify_path

        problem = path_problem(args.path, directory=True)  # a checkpoint or a save dir: a directory either way
        if problem is not None:
            return _refuse("verify", problem)
        lines, code = verify_path(args.path, load=args.load)
        print("\n".join(lines))
        return code
    for save_dir in args.save_dir if isinstance(args.save_dir, list) else [args.save_dir]:
        problem = not_a_save_dir(save_dir)
        if problem is not None:
            return _refuse(args.verb, problem)
    return {"status": _status, "list": _list, "prune": _prune, "plot": _plot, "export": _export}[args.verb](args)


def _status(args: argparse.Namespace) -> int:
    from telepathy.tools.status import format_status, format_status_table, run_status

    statuses = [run_status(save_dir) for save_dir in args.save_dir]
    if args.json:
        print(json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=1))
    else:
        print(format_status(statuses[0]) if len(statuses) == 1 else format_status_table(statuses))
    return 0


def _list(args: argparse.Namespace) -> int:
    from telepathy.tools.status import format_rows, list_checkpoints, rows_as_dicts

    rows = list_checkpoints(args.save_dir, verify=args.verify)
    print(json.dumps(rows_as_dicts(rows), indent=1) if args.json else format_rows(rows))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from telepathy.disk.retention import RetentionPolicy
    from telepathy.errors import SaveDirBusy, UsageError
    from telepathy.store.checkpoint_store import CheckpointStore

    policy = RetentionPolicy(keep_last=args.keep_last, keep_best=args.keep_best, keep_every=args.keep_every)
    store = CheckpointStore(args.save_dir, policy, differential=True)  # collects the blobs pruned ones referenced
    problems = store.dir.layout_problems()
    if problems:
        print(f"telepathy prune: {problems[0]}", file=sys.stderr)
        return EXIT_USAGE
    if not args.dry_run:
        try:
            store.lock.acquire()  # never prune under a live run: it prunes by its own policy
        except SaveDirBusy as exc:
            print(f"telepathy prune: {exc}", file=sys.stderr)
            return EXIT_SAVE_DIR_BUSY
        except (UsageError, OSError) as exc:
            print(f"telepathy prune: cannot take the save dir: {exc}", file=sys.stderr)
            return EXIT_USAGE
    removed = store.prune(dry_run=args.dry_run)
    if not args.dry_run:
        store.close()
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(removed)} checkpoint(s); kept {len(store.committed()) - (len(removed) if args.dry_run else 0)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from telepathy.tools.plot import plot_run
    from telepathy.tools.run_events import describe_skipped

    out = args.out or args.save_dir / "run.png"
    if os.path.isdir(out):
        return _refuse("plot", f"--out {out} is a directory; give a file name, e.g. {out / 'run.png'}")
    try:
        written, skipped = plot_run(args.save_dir, out)
    except ImportError:
        return _refuse("plot", "needs matplotlib (pip install matplotlib)")
    except ValueError as exc:
        print(f"telepathy plot: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        return _refuse("plot", f"cannot write {out}: {exc.strerror or exc}")
    print(f"wrote {written}")
    if skipped:
        print(f"note: {describe_skipped(skipped)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from telepathy.disk.catalog import Catalog
    from telepathy.disk.manifest import MANIFEST_NAME
    from telepathy.disk.save_dir import SaveDir
    from telepathy.errors import CheckpointInvalid
    from telepathy.tools.export import export_checkpoint

    if args.checkpoint is not None and path_problem(args.checkpoint / MANIFEST_NAME, directory=False):
        return _refuse("export", f"--checkpoint {args.checkpoint} is not a checkpoint directory (no {MANIFEST_NAME}); "
                       f"pick one that `telepathy list {args.save_dir}` shows")  # fmt: skip
    try:
        checkpoint = args.checkpoint or Catalog(SaveDir(args.save_dir)).resume_point()
    except CheckpointInvalid as exc:  # none verifies: the warnings above say why
        print(f"telepathy export: {exc}", file=sys.stderr)
        return 1
    if checkpoint is None:
        print(f"telepathy export: {args.save_dir} has no committed checkpoint yet", file=sys.stderr)
        return 1
    out = args.out or args.save_dir / "export" / Path(checkpoint).name
    inside = _inside_checkpoint_tree(SaveDir(args.save_dir), Path(out))
    if inside:
        return _refuse("export", f"--out {out} is inside the save dir's {inside}, where telepathy keeps checkpoints "
                       "(a file there changes a committed one, a directory looks like a damaged one); pick a path "
                       "outside it")  # fmt: skip
    if os.path.lexists(out) and not os.path.isdir(out):  # a new directory is made, an existing one used
        return _refuse("export", f"--out {out} exists and is not a directory; give a new or empty directory")
    try:
        written = export_checkpoint(Path(checkpoint), out)
    except (CheckpointInvalid, ValueError, FileExistsError) as exc:
        print(f"telepathy export: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out where nothing can be written (/proc, a read-only disk, a full one)
        return _refuse("export", f"cannot write to {out}: {exc.strerror or exc}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _inside_checkpoint_tree(save_dir: Any, out: Path) -> str | None:
    """The part of the save dir (checkpoints/, emergency/, blobs/, latest) that ``out`` lies in, or None."""
    where = Path(os.path.realpath(out))  # (realpath never raises: a link loop, say a broken latest, stays a path)
    root = Path(os.path.realpath(save_dir.root))
    places = [Path(os.path.realpath(p)) for p in (save_dir.checkpoints, save_dir.emergency, save_dir.blobs)]
    for place in [*places, root / save_dir.latest.name]:  # (latest itself: where it points is not the save dir's)
        if where.is_relative_to(place):
            return place.name + ("" if place.name == save_dir.latest.name else "/")
    return None


def _refuse(verb: str, problem: str) -> int:
    """A usage error of ``verb``: one line on stderr, exit code 2."""
    print(f"telepathy {verb}: {problem}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
