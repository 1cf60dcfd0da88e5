import pytest

from telepathy import training_signals


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Every test leaves the process's signal handlers as it found them."""
    yield
    training_signals.uninstall_signal_handlers()
