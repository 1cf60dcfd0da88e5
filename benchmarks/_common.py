"""``--dir`` of every benchmark: a writable directory that exists, or one line on stderr and exit 2 (it is not
created: a typo would otherwise measure whatever disk holds the new directory)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def usable_dir(path: Path | None, prog: str) -> Path | None:
    if path is None:
        return None
    problem = None
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist; create it first (on the disk to measure)"
    elif not os.access(path, os.W_OK | os.X_OK):
        problem = "is not writable by this user"
    if problem:
        print(f"{prog}: --dir {path} {problem}", file=sys.stderr)
        sys.exit(2)
    return path
