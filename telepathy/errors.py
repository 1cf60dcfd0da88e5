"""Every error telepathy raises on purpose, and the exit code each one means (standard library only: the
supervisor and the operator CLI read this without torch).

    TelepathyError                       exit 1 unless a subclass says otherwise
      UsageError (also ValueError)       2   a bad flag or value; a rerun would fail the same way
      CannotResume                       3   the checkpoint does not fit this run, or strict resume refused it
        ResumeMismatchError              3   saved with other settings (batch size, seed, shapes, ...)
        CheckpointInvalid                3   a checkpoint failed verification (file, reason)
          UnsafeCheckpointError          3   a file would run code or is not plain tensors and data
      SaveDirBusy                        75  another live run writes to the save dir
      CheckpointWriteError               1   a save failed with an I/O error; nothing of it was committed

0, 99 and 130 are the spec's codes for a complete run, a preemption with a durable checkpoint and Ctrl+C; 129
is SIGHUP's stop (saved), and 98 a stop by a signal for which nothing new could be saved (a failed save, a command
that does not save: the next run resumes from the newest older checkpoint, or starts over). The
refusals (2, 3, 75) are codes a restart or a requeue would repeat, so the supervisor does not restart them and the
submit script does not requeue them.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_COMPLETE = 0  # training complete
EXIT_FAILED = 1  # an unexpected failure (traceback above)
EXIT_USAGE = 2  # bad flags or values (argparse)
EXIT_CANNOT_RESUME = 3  # the checkpoint does not fit this run, or strict resume found it invalid
EXIT_SAVE_DIR_BUSY = 75  # another live run writes to the save dir (EX_TEMPFAIL)
EXIT_STOPPED_UNSAVED = 98  # stopped by a signal, but nothing new was saved: the next run resumes from an older point
EXIT_REQUEUE = 99  # preempted with a durable checkpoint: requeue
EXIT_HANGUP = 129  # SIGHUP (the terminal closed): saved, stopped
EXIT_INTERRUPTED = 130  # SIGINT: saved, stopped by a person

NOT_RESTARTED = (EXIT_USAGE, EXIT_CANNOT_RESUME, EXIT_SAVE_DIR_BUSY)


class TelepathyError(Exception):
    """Base of the errors telepathy raises on purpose; ``exit_code`` is what a program ending with it exits."""

    exit_code = EXIT_FAILED


class UsageError(TelepathyError, ValueError):
    """A bad argument or option value, named with what to do instead."""

    exit_code = EXIT_USAGE


class CannotResume(TelepathyError):
    """This run cannot resume from what the save dir holds; restarting would fail the same way."""

    exit_code = EXIT_CANNOT_RESUME


class ResumeMismatchError(CannotResume, RuntimeError):
    """The checkpoint was made with settings that this run does not share; resuming would silently diverge."""


class CheckpointInvalid(CannotResume):
    """A checkpoint directory failed verification; ``file`` and ``reason`` say where and why."""

    def __init__(self, directory: Path, file: str, reason: str) -> None:
        super().__init__(f"{directory}/{file}: {reason}")
        self.directory = directory
        self.file = file
        self.reason = reason

    def __reduce__(self):  # picklable with its three fields (it crosses process boundaries in tests and ranks)
        return (type(self), (self.directory, self.file, self.reason))


class UnsafeCheckpointError(CheckpointInvalid, RuntimeError):
    """A checkpoint file asks to run code (or is otherwise not plain tensors and primitives)."""

    def __init__(self, message: str, directory: Path | None = None, file: str = "") -> None:
        Exception.__init__(self, message)
        self.directory, self.file, self.reason = directory or Path("."), file, message

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self):
        return (type(self), (self.reason, self.directory, self.file))


class SaveDirBusy(TelepathyError, RuntimeError):
    """Another live process is the writer of this save directory."""

    exit_code = EXIT_SAVE_DIR_BUSY


class CheckpointWriteError(TelepathyError, RuntimeError):
    """A save failed with an I/O error (disk full, EIO, EACCES); nothing of it was committed."""

    def __init__(self, message: str, error: OSError) -> None:
        super().__init__(message)
        self.errno = error.errno


def run_program(train: Callable[[], int], log: logging.Logger) -> int:
    """A training program's exit code: ``train()``'s, or for telepathy's errors one line and their own code (a
    refusal a restart would repeat: 75, 3, 2; a failed save: 1); an OSError before training (a full or read-only
    disk at start) is one line and 1."""
    try:
        return train()
    except TelepathyError as exc:
        log.error("%s", describe(exc))
        return exc.exit_code
    except OSError as exc:
        log.error("cannot use the save dir: %s", exc)
        return EXIT_FAILED


def describe(error: BaseException) -> str:
    """One line for the console: what went wrong, prefixed by what it means for the run."""
    if isinstance(error, CannotResume) and not str(error).startswith("cannot resume"):
        return f"cannot resume: {error}"
    return str(error)


_uncaught_exit_code: int | None = None  # set by the hook below for an uncaught error with a code of its own
_hook_installed = False


def exit_with_error_codes() -> None:
    """Make an uncaught :class:`TelepathyError` end the program with its own exit code (3 for a resume mismatch,
    2 for a bad option), not Python's 1: a supervisor or a submit script must not restart or requeue a refusal
    that would repeat. The traceback is printed as usual. Python always exits 1 after an uncaught exception, so
    an exit handler registered here, before the program's own, ends the process with the code once everything
    else (the program's exit handlers, its non-daemon threads such as a background save) has finished."""
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback: object) -> None:
        global _uncaught_exit_code
        previous(kind, error, traceback)
        code = getattr(error, "exit_code", EXIT_FAILED) if isinstance(error, TelepathyError) else EXIT_FAILED
        if code != EXIT_FAILED:
            meaning = {EXIT_USAGE: "a usage error", EXIT_CANNOT_RESUME: "cannot resume",
                       EXIT_SAVE_DIR_BUSY: "the save dir is busy"}.get(code, kind.__name__)  # fmt: skip
            print(f"[telepathy] exit code {code} ({meaning}): running it again would fail the same way",
                  file=sys.stderr, flush=True)  # fmt: skip
            _uncaught_exit_code = code

    sys.excepthook = hook
    atexit.register(_exit_with_uncaught_code)


def _exit_with_uncaught_code() -> None:
    if _uncaught_exit_code is None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_uncaught_exit_code)
