"""``python -m telepathy <verb> ...``: tools for the person running the jobs.

python -m telepathy verify SAVE_DIR_OR_CHECKPOINT [--load]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telepathy", description="Inspect telepathy save dirs.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verify = verbs.add_parser("verify", help="check checkpoints against their manifests; exit 1 on any failure")
    verify.add_argument("path", type=Path, help="a save dir or one checkpoint directory")
    verify.add_argument("--load", action="store_true", help="also load every file with weights_only=True")
    args = parser.parse_args(argv)
    if args.verb == "verify":
        from telepathy.verify import verify_path

        lines, code = verify_path(args.path, load=args.load)
        print("\n".join(lines))
        return code
    return 2


if __name__ == "__main__":
    sys.exit(main())
