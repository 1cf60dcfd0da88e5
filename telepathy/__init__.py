"""telepathy: preemption-safe PyTorch training.

Signals set flags, the loop saves at step boundaries into atomic, verified checkpoints, and a resumed run
continues bit-identically. Start with :class:`telepathy.checkpointer.Checkpointer` and
:mod:`telepathy.training_signals`.
"""

__version__ = "0.1.0"
