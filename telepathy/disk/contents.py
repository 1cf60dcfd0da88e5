"""What a checkpoint directory contains, as one table of file names (no torch):

    <part>.pt          one per entry of ``Checkpointer(parts=...)``: that object's state_dict
    optimizer.pt       optimizer, LR scheduler and GradScaler state
    state.pt           position, RNG states, run signature and metadata (written last)
    rank_<r>.pt        several ranks: each rank's own RNG states
    __<r>_<n>.distcp   sharded (DCP) state of rank r; sharded.metadata: DCP's global metadata
    manifest.json      every file above with its size and hash (written last: the commit marker)

Code that adds a file kind to checkpoints adds it here; the checkpointer, the all-ranks commit, export and verify
read their names from this module.
"""

from __future__ import annotations

OPTIMIZER = "optimizer"
STATE = "state"
RESERVED_PARTS = frozenset({OPTIMIZER, STATE})
PART_SUFFIX = ".pt"
RANK_PREFIX = "rank_"
SHARD_SUFFIX = ".distcp"
SHARD_METADATA = "sharded.metadata"
MANIFEST = "manifest.json"


def part_file(name: str) -> str:
    """``encoder`` -> ``encoder.pt``."""
    return f"{name}{PART_SUFFIX}"


def rank_part(rank: int) -> str:
    """The part name of a rank's own file (``rank_00001``), loaded like any part."""
    return f"{RANK_PREFIX}{rank:05d}"


def shard_pattern(rank: int) -> str:
    """A glob for the DCP shard files one rank writes."""
    return f"__{rank}_*{SHARD_SUFFIX}"


def part_name(file: str) -> str | None:
    """The part name of a ``.pt`` file, or None for other files."""
    return file[: -len(PART_SUFFIX)] if file.endswith(PART_SUFFIX) else None


def model_parts(files: list[str] | dict[str, object]) -> list[str]:
    """The trained parts among a manifest's files (not the optimizer, the state or a rank's RNG file)."""
    names = [part_name(f) for f in files]
    return [n for n in names if n is not None and n not in RESERVED_PARTS and not n.startswith(RANK_PREFIX)]
