"""A copy of many tensors that runs in a thread of its own while the trainer goes on describing its state.

A per-step snapshot is a copy (memory-bound, done in C++ without the GIL) and Python work (the state's structure,
its RNG states, its JSON; CPU-bound, with the GIL). For a big state the copy dominates, and the two can overlap on
two cores: :class:`OverlappedCopy` starts ``torch._foreach_copy_`` in its thread, and the trainer's Python work runs
beside it. Small states gain nothing: handing a copy to a thread costs about as much as the copy itself.

The thread needs the GIL to start the copy, and the trainer holds it while it works in Python; :meth:`start`
therefore waits (without the GIL) until the copy has begun, which costs tens of microseconds, not the switch
interval. Waking the thread takes longer than starting the copy; the caller may copy other tensors meanwhile.
Whoever starts a copy must :meth:`wait` for it before touching its destinations again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch


class OverlappedCopy:
    """One daemon thread, started on first use, copying ``sources`` into ``destinations`` when asked."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._pid = 0  # (a forked child has no such thread: it copies synchronously instead)
        self._go = threading.Event()
        self._begun = threading.Event()
        self._done = threading.Event()
        self._job: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._failed: BaseException | None = None
        self._running = False

    def start(self, destinations: list[torch.Tensor], sources: list[torch.Tensor],
              meanwhile: Callable[[], None] | None = None) -> bool:  # fmt: skip
        """Begin the copy in the thread; False (nothing started) where there is no thread to do it. ``meanwhile()``
        runs while the thread wakes (a sleeping thread takes a tenth of a millisecond or more on a VM): work of
        the caller's own that releases the GIL, such as a copy of other tensors."""
        if self._running:
            raise RuntimeError("a copy is already running; wait() for it first")
        if self._thread is None or self._pid != os.getpid():
            if self._thread is not None:  # forked: the thread stayed in the parent
                return False
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._serve, name="telepathy-snapshot-copy", daemon=True)
            self._thread.start()
        self._job, self._failed, self._running = (destinations, sources), None, True
        self._begun.clear()
        self._done.clear()
        self._go.set()
        if meanwhile is not None:
            meanwhile()
        self._begun.wait()  # (lets the thread take the GIL now; it gives it back once the copy has begun)
        return True

    def wait(self) -> bool:
        """Block until the copy started last has ended; True when it completed, False when none was running or
        it failed (then nothing it wrote may be trusted: copy again)."""
        if not self._running:
            return False
        self._done.wait()
        self._running, self._job = False, None
        return self._failed is None

    @property
    def running(self) -> bool:
        return self._running

    def _serve(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            destinations, sources = self._job or ([], [])
            self._begun.set()
            try:
                with torch.inference_mode():
                    torch._foreach_copy_(destinations, sources)
            except BaseException as exc:  # (reported by wait(); the trainer copies again itself)
                self._failed = exc
            finally:
                self._done.set()
