"""Flag-based signal handling: real signals sent to this process with os.kill."""

from __future__ import annotations

import dis
import os
import signal
import threading
import time

import pytest
import torch

from telepathy import training_signals as ts
from telepathy.data import resumable_loader
from telepathy.errors import UsageError
from telepathy.save_policy import Decision, Requests, SavePolicy


def send(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs at the next bytecode boundary; give it one


def test_sigterm_requests_save_and_requeue_exit():
    ts.install_signal_handlers()
    assert not ts.should_exit_training() and ts.exit_code() == 0
    send(signal.SIGTERM)
    assert ts.save_reason() == "signal:SIGTERM"
    assert ts.should_save_checkpoint(interval=300)
    assert ts.should_exit_training()
    assert ts.exit_code() == ts.EXIT_REQUEUE == 99


def test_sigusr1_requests_one_save_and_training_continues():
    ts.install_signal_handlers()
    send(signal.SIGUSR1)
    assert ts.should_save_checkpoint(interval=300)
    ts.mark_checkpoint_saved()
    assert not ts.should_save_checkpoint(interval=300), "the request is consumed by the save"
    assert not ts.should_exit_training() and ts.exit_code() == 0


def test_sigint_gives_130_without_keyboardinterrupt():
    ts.install_signal_handlers()
    send(signal.SIGINT)  # would raise KeyboardInterrupt with Python's default handler
    assert ts.should_exit_training() and ts.exit_code() == ts.EXIT_INTERRUPTED == 130


def test_first_exit_signal_decides_the_exit_code():
    ts.install_signal_handlers()
    send(signal.SIGINT)
    send(signal.SIGTERM)
    assert ts.exit_code() == 130 and ts.exit_signal() == signal.SIGINT


def test_exit_request_keeps_save_due_after_consumption():
    ts.install_signal_handlers()
    send(signal.SIGTERM)
    assert ts.should_save_checkpoint()
    assert ts.should_save_checkpoint(), "a pending exit always wants its save"


def test_signal_during_save_requests_another_save():
    ts.install_signal_handlers()
    send(signal.SIGUSR1)
    assert ts.should_save_checkpoint()
    send(signal.SIGUSR1)  # arrives while the first save is being written
    ts.mark_checkpoint_saved()
    assert ts.should_save_checkpoint()


def test_interval_clock_starts_at_install_and_restarts_at_mark():
    time.sleep(0.06)  # long after import
    ts.install_signal_handlers()
    assert not ts.should_save_checkpoint(interval=5), "clock must start at install, not at import"
    time.sleep(0.06)
    assert ts.should_save_checkpoint(interval=0.05)
    ts.mark_checkpoint_saved()
    assert not ts.should_save_checkpoint(interval=5)
    assert ts.seconds_since_checkpoint() < 5


def test_interval_names_and_validation():
    ts.install_signal_handlers()
    assert ts.should_save_checkpoint(interval=300) is False  # the README's call (the seed raised TypeError)
    assert ts.should_save_checkpoint(interval_seconds=300) is False  # the old code's keyword
    assert ts.should_save_checkpoint() is False  # signals only
    with pytest.raises(TypeError):
        ts.should_save_checkpoint(interval=1, interval_seconds=2)
    with pytest.raises(ValueError, match="> 0"):
        ts.should_save_checkpoint(interval=-1)


def test_caller_can_add_signals():
    ts.install_signal_handlers(extra={signal.SIGUSR2: ts.Action.SAVE_AND_REQUEUE})
    assert signal.SIGUSR2 in ts.handled_signals()
    send(signal.SIGUSR2)
    assert ts.should_exit_training() and ts.exit_code() == 99
    with pytest.raises(TypeError, match="Action"):
        ts.install_signal_handlers(extra={signal.SIGUSR2: "requeue"})


def test_uninstall_restores_previous_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    sigint_before = signal.getsignal(signal.SIGINT)  # (Python's default, or SIG_IGN when started in the background)
    try:
        ts.install_signal_handlers()
        assert signal.getsignal(signal.SIGINT) is not sigint_before
        ts.uninstall_signal_handlers()
        send(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_install_refuses_other_threads():
    errors = []
    thread = threading.Thread(target=lambda: _capture(errors, ts.install_signal_handlers))
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


def _capture(errors, fn):
    try:
        fn()
    except RuntimeError as exc:
        errors.append(exc)


def test_handler_only_sets_flags():
    """No calls at all in the handler: no print, logging, locks, I/O or allocation-heavy work."""
    ops = {ins.opname for ins in dis.get_instructions(ts._on_signal)}
    assert not {op for op in ops if op.startswith("CALL") or op.startswith("IMPORT")}, ops


class _WorkerProbe(torch.utils.data.Dataset):
    """Reports, from inside the worker, how the worker treats SIGUSR1 and SIGTERM."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT))
        time.sleep(0.005)
        return torch.tensor([index, int(ignored), os.getpid()])


def test_dataloader_workers_ignore_and_survive_training_signals():
    ts.install_signal_handlers()
    loader = resumable_loader(_WorkerProbe(), 4, seed=0, epoch=0, num_workers=2)
    it = iter(loader)
    first = next(it)
    worker_pids = {int(p) for p in first[:, 2]} | {w.pid for w in it._workers}
    assert os.getpid() not in worker_pids
    for pid in worker_pids:
        os.kill(pid, signal.SIGUSR1)  # SLURM signals every process of the step
        os.kill(pid, signal.SIGTERM)
    rest = list(it)
    seen = torch.cat([first] + rest)
    assert sorted(seen[:, 0].tolist()) == list(range(64)), "every sample delivered despite the signals"
    assert bool(seen[:, 1].all()), "workers must ignore the training signals"
    assert not ts.should_exit_training(), "signals to workers are not signals to the trainer"


def test_agreed_decisions_win_over_a_signal_that_arrives_after_the_agreement():
    """Distributed mode: a SIGTERM on this rank just after the all-reduce must wait for the next agreement,
    or this rank would stop while the others go on into the next collective."""
    ts.install_signal_handlers()
    policy = SavePolicy(interval=None)
    agreed = Requests()  # all ranks agreed: nothing to do at this boundary
    send(signal.SIGTERM)  # arrives after the agreement
    assert policy.decide(agreed) == Decision(save=False, stop=False, reason="none")
    assert policy.requests(step=2) == Requests(save=True, due=False, exit_signum=signal.SIGTERM)  # the next one
    decision = policy.decide(policy.requests(step=2))
    assert decision == Decision(save=True, stop=True, reason="signal:SIGTERM") and ts.exit_code() == 99


def test_a_rank_without_the_signal_adopts_the_agreed_stop_and_its_exit_code():
    ts.install_signal_handlers()
    decision = SavePolicy(interval=None).decide(Requests(exit_signum=signal.SIGTERM))  # another rank got it
    assert decision.save and decision.stop and ts.should_exit_training() and ts.exit_code() == 99


def test_every_n_steps_and_bad_values_fail_at_construction():
    ts.install_signal_handlers()
    policy = SavePolicy(interval=None, every_steps=3)
    assert [policy.requests(step).due for step in range(1, 7)] == [False, False, True, False, False, True]
    assert policy.decide(policy.requests(3)).reason == "steps"
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="interval"):
            SavePolicy(interval=bad)
    with pytest.raises(UsageError, match="every_steps"):
        SavePolicy(every_steps=0)


def test_steps_between_agreements_fits_the_grace_period():
    from telepathy.distributed import steps_between_agreements

    assert steps_between_agreements(120, step_seconds=1.0, save_seconds=10) == 1  # long steps: agree every step
    # 10 ms steps: 2 ms per agreement would cost 20%; every 20 steps keeps it at 1%, well inside the grace
    assert steps_between_agreements(120, step_seconds=0.01, save_seconds=10) == 20
    # a tight grace period caps k: (30/2 - 14) s / 0.01 s = 100 steps at most, fewer are wanted anyway
    assert steps_between_agreements(30, step_seconds=0.01, save_seconds=14.5, agreement_seconds=0.05) == 50
    with pytest.raises(ValueError, match="longer warning"):
        steps_between_agreements(20, step_seconds=1.0, save_seconds=15)
