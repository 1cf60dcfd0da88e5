import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))  # harness, fault_harness, workers

from slurm_cluster import cluster  # noqa: E402, F401 (the local SLURM fixture, for every folder)

from telepathy import training_signals  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Every test leaves the process's signal handlers as it found them."""
    yield
    training_signals.uninstall_signal_handlers()
