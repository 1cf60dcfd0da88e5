import pytest
from lightning_runs import reference_run


@pytest.fixture(scope="session")
def lightning_reference(tmp_path_factory):
    """The worker's run with validation, uninterrupted and outside SLURM (step delays change timing, never
    numbers), shared by the local and the SLURM tests."""
    return reference_run(tmp_path_factory.mktemp("lightning-reference"), "--val")
