"""Signal handling for preemptible training.

Handlers only set flags. Python runs a handler between bytecodes on the main thread, so a handler that
prints, takes a lock or writes a file can deadlock or corrupt whatever the interrupted code was doing. The
training loop polls the flags at a step boundary, where the model, optimizer and data position agree, and
acts there: save, then continue or exit.

Signal table (the defaults; callers may add or remap signals, e.g. SIGUSR2 when NCCL owns SIGUSR1):

    SIGTERM  scheduler preemption / time-limit warning  save, exit 99 (ready to requeue)
    SIGUSR1  manual save request                        save, continue training
    SIGINT   Ctrl+C                                      save, exit 130 (no traceback)
    SIGHUP   the terminal closed                         save, exit 129

A stop whose save failed (a full disk) exits 98 instead: the next run resumes from the previous checkpoint.
"""

from __future__ import annotations

import atexit
import enum
import json
import logging
import os
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Mapping

from telepathy.errors import (  # noqa: F401 (public names)
    EXIT_COMPLETE,
    EXIT_HANGUP,
    EXIT_INTERRUPTED,
    EXIT_REQUEUE,
    EXIT_STOPPED_UNSAVED,
    exit_with_error_codes,
)


class Action(enum.Enum):
    """What the loop should do at the next step boundary after a signal."""

    SAVE_AND_CONTINUE = "save_and_continue"
    SAVE_AND_REQUEUE = "save_and_requeue"  # exit EXIT_REQUEUE
    SAVE_AND_STOP = "save_and_stop"  # exit EXIT_INTERRUPTED


DEFAULT_ACTIONS: dict[int, Action] = {
    signal.SIGTERM: Action.SAVE_AND_REQUEUE,
    signal.SIGUSR1: Action.SAVE_AND_CONTINUE,
    signal.SIGINT: Action.SAVE_AND_STOP,
    signal.SIGHUP: Action.SAVE_AND_STOP,
}

_EXIT_CODES = {Action.SAVE_AND_REQUEUE: EXIT_REQUEUE, Action.SAVE_AND_STOP: EXIT_INTERRUPTED}
_STOP_CODES = {signal.SIGHUP: EXIT_HANGUP}  # stops whose code is the signal's own (128 + 1)
REPORT_FD_ENV = "TELEPATHY_REPORT_FD"  # a supervisor's pipe: events of this process, the handshake first


class _SignalState:
    """Module-level flags. Written by handlers (plain attribute stores only), read by the loop."""

    def __init__(self) -> None:
        self.actions: dict[int, Action] = {}
        self.exit_signals: frozenset[int] = frozenset()  # signals whose action ends training
        self.previous_handlers: dict[int, object] = {}
        self.save_requested = False
        self.exit_signum: int | None = None  # first signal whose action ends training
        self.signals_received = 0
        self.last_signum: int | None = None
        self.last_save_time = time.monotonic()  # the clock of should_save_checkpoint(interval) below
        self.stop_unsaved = False  # the save for the stop failed: exit 98, not 99


_state = _SignalState()


def _on_signal(signum: int, frame: object) -> None:
    # Flags only: no print, no logging, no locks, no I/O, no function calls (a test checks the bytecode).
    _state.signals_received += 1
    _state.last_signum = signum
    _state.save_requested = True
    if _state.exit_signum is None and signum in _state.exit_signals:
        _state.exit_signum = signum


def install_signal_handlers(extra: Mapping[int, Action] | None = None) -> None:
    """Install flag-setting handlers for the signal table (plus ``extra``) and start the interval clock.

    Must be called from the main thread (Python only delivers signals there). Calling it again re-installs
    and resets the flags; ``uninstall_signal_handlers`` restores whatever was installed before.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "install_signal_handlers() must be called from the main thread: Python delivers signals only "
            "there. Call it at the start of your training script, before starting threads."
        )
    uninstall_signal_handlers()
    actions = dict(DEFAULT_ACTIONS)
    for signum, action in (extra or {}).items():
        if not isinstance(action, Action):
            raise TypeError(f"action for signal {signum} must be a telepathy Action, got {action!r}")
        actions[int(signum)] = action
    _state.__init__()
    _state.actions = actions
    _state.exit_signals = frozenset(s for s, a in actions.items() if a is not Action.SAVE_AND_CONTINUE)
    for signum in actions:
        _state.previous_handlers[signum] = signal.signal(signum, _on_signal)
    _tell_supervisor()
    exit_with_error_codes()  # an uncaught refusal (a resume mismatch) exits 3, and is not restarted
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_ignore_at_exit)
        _exit_hook_registered = True


_exit_hook_registered = False


def report_fd() -> int | None:
    """The supervisor's report pipe, if this process really has it: a launcher that closes inherited descriptors
    (torchrun starts its workers with ``close_fds``) leaves the number in the environment, and by then it may name
    a socket or file of this process that a JSON line must not be written into."""
    fd = os.environ.get(REPORT_FD_ENV, "")
    try:
        return int(fd) if fd.isdigit() and stat.S_ISFIFO(os.fstat(int(fd)).st_mode) else None
    except OSError:
        return None


def _tell_supervisor() -> None:
    """The handshake: a supervising wrapper learns that this process saves on signals (so it may forward SIGUSR1,
    and signals it held during start-up)."""
    fd = report_fd()
    if fd is None:
        return
    try:
        record = {"event": "handlers", "pid": os.getpid(), "started": _start_time(), "time": time.time()}
        os.write(fd, (json.dumps(record) + "\n").encode())
    except BrokenPipeError:
        _supervisor_lost()  # gone before this process could shake hands
        return
    except OSError:
        return
    if _lost_supervisor == os.getpid():  # it went while the handlers were out (uninstalled, being reinstalled)
        _supervisor_lost()
    _follow_supervisor(fd)


_following: int | None = None  # the pid whose thread watches the supervisor's pipe (a forked child has none)
_lost_supervisor: int | None = None  # the pid that saw the pipe close (acted on at its next install if not then)


def _start_time() -> int | None:
    """This process's start time (/proc/self/stat field 22), which the supervisor keeps with its pid: a pid alone
    may name another process once this one is gone."""
    try:
        with open("/proc/self/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _follow_supervisor(fd: int) -> None:
    """Stop as on SIGTERM (save, then exit 99) when the supervisor is gone: a trainer behind a shell or launcher
    is not its child, so its death (``kill -9``, the OOM killer) reaches it as nothing but the report pipe's read
    end closing. Without this it would train on unsupervised, holding the save dir's lock. The thread watches a
    private duplicate of the descriptor, so the program closing or reusing the number cannot look like that."""
    global _following
    if _following == os.getpid():
        return
    own = os.dup(fd)  # (not inherited by a process this one starts)
    _following = os.getpid()

    def watch() -> None:
        poller = select.poll()
        poller.register(own, select.POLLERR | select.POLLHUP)  # a pipe's write end: POLLERR once no reader is left
        try:
            events = 0
            while not events:
                events = sum(e for _, e in poller.poll())
        except OSError:
            return
        if events & select.POLLNVAL or _following != os.getpid():
            return
        _supervisor_lost()

    threading.Thread(target=watch, name="telepathy-supervisor-watch", daemon=True).start()


def _supervisor_lost() -> None:
    global _lost_supervisor
    _lost_supervisor = os.getpid()
    if installed():
        say("the supervising wrapper is gone (its end of the report pipe closed): saving and stopping as on SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)


def ignore_at_exit(signals: tuple[int, ...]) -> None:
    """For a process whose outcome is decided once it returns from its work (the supervisor): at interpreter exit
    ignore ``signals``, which Python would reset to their default action during teardown (a SIGUSR1 or SIGTERM
    there would end the process by the signal, -10 or -15, instead of its exit code)."""
    atexit.register(_ignore, signals)


def _ignore_at_exit() -> None:
    """At interpreter exit Python resets signals that have Python handlers to their default action, so a SIGUSR1
    (default: terminate) arriving during teardown would kill a run that already finished and saved (exit -10 instead
    of 0). The run's outcome is decided by then: ignore the table's signals for the last moments."""
    if _state.previous_handlers:
        _ignore(tuple(_state.actions))


def _ignore(signals: tuple[int, ...]) -> None:
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            signal.signal(signum, signal.SIG_IGN)


def say(message: str) -> None:
    """One console line for a person: through the ``telepathy`` logger when the program configured logging, else
    on stderr (a library user who set up nothing still sees a resume, a signal's save and an exit)."""
    logger = logging.getLogger("telepathy")
    if logger.hasHandlers():
        logger.info("%s", message)
    else:
        print(f"[telepathy] {message}", file=sys.stderr, flush=True)


def installed() -> bool:
    """Whether ``install_signal_handlers`` is in effect (re-installing would clear pending requests)."""
    return bool(_state.previous_handlers)


def uninstall_signal_handlers() -> None:
    """Restore the handlers that were in place before ``install_signal_handlers`` and clear the flags."""
    for signum, previous in _state.previous_handlers.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _state.__init__()


def handled_signals() -> list[int]:
    """Signals currently routed to telepathy (the default table when nothing is installed)."""
    return sorted(_state.actions or DEFAULT_ACTIONS)


def should_save_checkpoint(interval: float | None = None, *, interval_seconds: float | None = None) -> bool:
    """True when a signal asked for a save or ``interval`` seconds passed since the last save.

    A signal's save request is consumed by this call (the caller is expected to save now); a signal that
    arrives during that save requests another one. The exit request, if any, is kept until the process ends.
    ``interval_seconds`` is accepted as an alias for ``interval`` (the name older code used).
    """
    if interval is not None and interval_seconds is not None and interval != interval_seconds:
        raise TypeError("pass either interval= or interval_seconds=, not both with different values")
    seconds = interval if interval is not None else interval_seconds
    if seconds is not None and seconds <= 0:
        raise ValueError(f"checkpoint interval must be > 0 seconds, got {seconds}")
    if _state.save_requested:
        _state.save_requested = False
        return True
    if _state.exit_signum is not None:
        return True
    return seconds is not None and time.monotonic() - _state.last_save_time >= seconds


def save_reason() -> str:
    """Why a save is due, for logs and manifests: ``signal:SIGTERM`` style when a signal asked, else
    ``interval``. Call before ``should_save_checkpoint`` consumes the request."""
    if _state.exit_signum is not None:
        return f"signal:{signal_name(_state.exit_signum)}"
    if _state.save_requested:
        return f"signal:{signal_name(_state.last_signum)}"
    return "interval"


def save_requested() -> bool:
    """Whether a signal asked for a save that nobody took yet (read without consuming it)."""
    return _state.save_requested


def take_save_request() -> int | None:
    """Consume a signal's save request (the caller saves now); returns the signal that asked, or None."""
    if not _state.save_requested:
        return None
    _state.save_requested = False
    return _state.last_signum


def adopt_exit_signal(signum: int) -> None:
    """Act as if this process had received ``signum`` (another rank did; the ranks agreed to stop together), so
    that ``should_exit_training`` and ``exit_code`` answer the same on every rank."""
    if _state.exit_signum is None:
        _state.exit_signum = signum


def mark_checkpoint_saved() -> None:
    """Restart the interval clock; call after a checkpoint is committed."""
    _state.last_save_time = time.monotonic()


def seconds_since_checkpoint() -> float:
    return time.monotonic() - _state.last_save_time


def should_exit_training() -> bool:
    """True once a signal whose action ends training (SIGTERM, SIGINT by default) was received (or adopted from
    another rank)."""
    return _state.exit_signum is not None


def exit_signal() -> int | None:
    """The first signal that asked training to end, or None."""
    return _state.exit_signum


def exit_code() -> int:
    """Process exit code for the received signals: 99 (requeue) after SIGTERM, 130 after SIGINT, else 0."""
    if _state.exit_signum is None:
        return EXIT_COMPLETE
    if _state.stop_unsaved:
        return EXIT_STOPPED_UNSAVED
    if _state.exit_signum in _STOP_CODES:
        return _STOP_CODES[_state.exit_signum]
    return _EXIT_CODES[_state.actions.get(_state.exit_signum, Action.SAVE_AND_REQUEUE)]


def mark_stop_unsaved() -> None:
    """The save for this stop failed: ``exit_code`` becomes 98 (nothing new saved), never 99."""
    _state.stop_unsaved = True


def signal_name(signum: int | None) -> str:
    if signum is None:
        return "none"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def ignore_signals_in_worker(worker_id: int | None = None) -> None:
    """Make this process ignore the training signals. Use as (or inside) a DataLoader ``worker_init_fn``.

    SLURM signals every process of a job step, DataLoader workers included; SIGUSR1's default action would
    kill a worker and with it the training run. The main process alone decides when to save and exit.
    """
    for signum in handled_signals():
        signal.signal(signum, signal.SIG_IGN)
