"""A copy of many tensors that runs in a thread of its own while the trainer goes on describing its state.

A per-step snapshot is a copy (memory-bound, done in C++ without the GIL) and Python work (the state's structure,
its RNG states, its JSON; CPU-bound, with the GIL). For a big state the copy dominates, and the two can overlap on
two cores: :class:`OverlappedCopy` starts ``torch._foreach_copy_`` in its thread, and the trainer's Python work runs
beside it. Small states gain nothing: handing a copy to a thread costs about as much as the copy itself.

The thread needs the GIL to start the copy, and the trainer holds it while it works in Python; :meth:`start`
therefore waits (without the GIL) until the copy has begun, which costs tens of microseconds, not the switch
interval. Waking the thread takes longer than starting the copy; the caller may copy other tensors meanwhile.
Whoever starts a copy must :meth:`wait` for it before touching its destinations again. :class:`BegunCopy` keeps
what such a copy began from, to tell afterwards which tensors changed meanwhile and must be copied again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

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

    def stop(self) -> None:
        """Wait for a copy still running, then let the thread end (a later :meth:`start` makes a new one)."""
        self.wait()
        thread, self._thread = self._thread, None
        if thread is not None and self._pid == os.getpid():
            self._job = None  # (no job: the thread ends)
            self._go.set()
            thread.join()

    @property
    def running(self) -> bool:
        return self._running

    def _serve(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            if self._job is None:  # stop()
                return
            destinations, sources = self._job
            self._begun.set()
            try:
                with torch.inference_mode():
                    torch._foreach_copy_(destinations, sources)
            except BaseException as exc:  # (reported by wait(); the trainer copies again itself)
                self._failed = exc
            finally:
                destinations = sources = None  # (holds no view of a slot, no alias, once the copy ended)
                self._done.set()


class BegunCopy:
    """A copy begun before the state was described (by the thread, and by the trainer while the thread woke):
    which views it copies (``begun``), from which aliases of the tensors' storage, and each tensor as it was when
    the copy began (object, address, version). The addresses and versions are read once the copy is under way:
    until the step boundary ends only telepathy's own code runs in this thread."""

    def __init__(self, layout: Any, destinations: list[torch.Tensor], sources: list[torch.Tensor],
                 begun: list[int], aliases: list[torch.Tensor]) -> None:  # fmt: skip
        self.layout, self.destinations, self.sources, self.begun = layout, destinations, sources, begun
        self.aliases = aliases  # (keep each storage object alive while the thread reads it)
        self.pointers = [t.data_ptr() for t in sources]
        self.versions = [t._version for t in sources]

    def changed(self, sources: list[torch.Tensor]) -> list[int]:
        """The views whose tensor changed since the copy began: another object, another storage or offset
        (``.data =``, ``set_``, ``swap_tensors``: an alias keeps the copied storage object alive, so its address
        cannot be reused), or changed in place (its version). Not a storage freed in place
        (``untyped_storage().resize_``) by other code while the thread reads it: that frees the bytes of every
        tensor sharing it, the alias's too; nothing but telepathy's code runs in this thread meanwhile."""
        return [i for i, (now, was, pointer, version) in enumerate(zip(sources, self.sources, self.pointers,
                                                                        self.versions, strict=True))
                if now is not was or now.data_ptr() != pointer or now._version != version]  # fmt: skip

    def others(self, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> tuple[list, list]:
        """The (destinations, sources) the begun copy leaves out: the trainer may copy them while it runs."""
        if len(self.begun) == len(sources):
            return [], []
        others = sorted(set(range(len(sources))).difference(self.begun))
        return [destinations[i] for i in others], [sources[i] for i in others]

    def redo(self, changed: list[int], completed: bool) -> list[int]:
        """The begun views to copy again once the thread ended: all if it did not complete, else those changed."""
        if not completed:
            return self.begun
        if len(self.begun) == len(self.sources):
            return changed
        begun = set(self.begun)
        return [i for i in changed if i in begun]


def storage_holds(tensor: torch.Tensor) -> bool:
    """Whether the tensor's storage has every byte its shape and strides read (not so after
    ``untyped_storage().resize_(0)``, as offloading does: a copy would read memory that is not there)."""
    if tensor.numel() == 0:
        return True
    if tensor.is_contiguous():
        reach = tensor.numel()  # (elements from the offset to the last one read, inclusive)
    else:
        reach = 1 + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    return tensor.untyped_storage().nbytes() >= (tensor.storage_offset() + reach) * tensor.element_size()
