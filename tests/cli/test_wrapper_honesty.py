"""The wrapper around three kinds of command — a script that knows nothing of telepathy, a shell in front of an aware
trainer, an aware trainer — under each signal: the exit code tells the truth (99/130/129 only with a checkpoint
committed for the stop, 98 otherwise), SIGUSR1 never kills, a signal in the first 100 ms is not lost, and the
trainer behind a shell gets the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from telepathy.disk.save_dir import SaveDir

pytestmark = pytest.mark.slow
MAIN = [sys.executable, "-m", "telepathy.preemptible_training"]
UNAWARE = textwrap.dedent("""
    import sys, time
    for i in range(100000):
        print(f"iteration {i}", flush=True)
        time.sleep(0.05)
""")
IGNORES_TERM = textwrap.dedent("""
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("iteration 0", flush=True)
    time.sleep(3600)
""")


def aware(save_dir: Path) -> list[str]:
    return [sys.executable, "-m", "telepathy.test_preemption", "--save_dir", str(save_dir), "--duration", "600",
            "--interval", "1000", "--step_delay", "0.02", "--log_every", "1"]  # fmt: skip


def command(kind: str, save_dir: Path) -> list[str]:
    if kind == "unaware":
        return [sys.executable, "-c", UNAWARE]
    if kind == "shell":  # no exec: bash stays the parent and would not pass a signal on
        return ["bash", "-c", " ".join(aware(save_dir)) + "; echo shell-after-trainer"]
    if kind == "pipe":  # bash and tee stay between us and the trainer; a signal to the group would kill them
        return ["bash", "-c", " ".join(aware(save_dir)) + f" 2>&1 | tee {save_dir.parent / 'tee.log'}"]
    if kind == "sh":  # sh forks the trainer and dies of a SIGTERM at once; the trainer goes on saving
        return ["sh", "-c", " ".join(aware(save_dir)) + "; echo shell-after-trainer"]
    if kind == "aware_short":  # finishes in a few steps
        return [sys.executable, "-m", "telepathy.latentwire.train", "--save_dir", str(save_dir), "--epochs", "1",
                "--samples", "64"]  # fmt: skip
    if kind == "ignores_term":
        return [sys.executable, "-c", IGNORES_TERM]
    return aware(save_dir)


def run(kind: str, save_dir: Path, signals: list[int], *, wait_for: str | None = "step 3 ", delay_s: float = 0.0,
        grace: float = 20) -> tuple[int, str]:  # fmt: skip
    proc = subprocess.Popen([*MAIN, "--save_dir", str(save_dir), "--grace_period", str(grace), "--max_restarts", "0",
                             "--", *command(kind, save_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while wait_for is not None and not any(wait_for in line or line.startswith(wait_for) for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.02)
    time.sleep(delay_s)
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(1.0)
    code = proc.wait(timeout=120)
    reader.join(timeout=5)
    return code, "".join(lines)


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGTERM, 99), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_an_aware_trainer_saves_for_the_stop_and_says_so(tmp_path, signum, expected):
    code, out = run("aware", tmp_path, [signum])
    assert code == expected, out[-2000:]
    assert SaveDir(tmp_path).committed(), "a checkpoint committed for the stop"


def test_a_trainer_behind_a_shell_gets_the_signal_and_saves(tmp_path):
    code, out = run("shell", tmp_path, [signal.SIGTERM])
    assert code == 99 and SaveDir(tmp_path).committed(), out[-2000:]


def test_sigusr1_saves_an_aware_trainer_and_never_kills_an_unaware_command(tmp_path):
    code, out = run("aware", tmp_path / "aware", [signal.SIGUSR1, signal.SIGTERM])
    assert code == 99 and "reason: signal:SIGUSR1" in out, out[-2000:]
    code, out = run("unaware", tmp_path / "unaware", [signal.SIGUSR1, signal.SIGTERM], wait_for="iteration 3")
    assert code == 98, out[-2000:]
    assert "SIGUSR1 not delivered" in out and "nothing new saved" in out
    assert "The next run starts from scratch: no checkpoint is committed." in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_an_unaware_command_stopped_by_a_signal_exits_98_not_99(tmp_path, signum):
    code, out = run("unaware", tmp_path, [signum], wait_for="iteration 3", grace=6)  # (held min(10 s, grace/2))
    assert code == 98 and "with nothing new saved (exit 98)" in out, out[-2000:]


def test_grace_expiry_without_a_save_is_98(tmp_path):
    code, out = run("ignores_term", tmp_path, [signal.SIGTERM], wait_for="iteration 0", grace=2)
    assert code == 98 and "grace period; killing it" in out, out[-2000:]


def test_a_signal_in_the_first_100_ms_waits_for_the_handlers_and_is_acted_on(tmp_path):
    code, out = run("aware", tmp_path, [signal.SIGTERM], wait_for=None, delay_s=0.1)
    assert code == 99, out[-2000:]
    assert SaveDir(tmp_path).committed() and "Traceback" not in out


MISMATCHING_LOOP = textwrap.dedent("""
    import sys
    import torch
    from telepathy.checkpointer import Checkpointer
    from telepathy.train_state import TrainState
    ckpt = Checkpointer(sys.argv[1], parts={"model": torch.nn.Linear(2, 2)},
                        signature={"batch_size": int(sys.argv[2])})
    state = ckpt.resume()
    ckpt.save(TrainState(global_step=1), "final")
    print("trained", flush=True)
""")


def test_a_resume_mismatch_in_a_users_loop_exits_3_and_is_not_restarted(tmp_path):
    """The user's own loop lets the refusal escape (no try/except): the process exits with the error's code (3),
    and the wrapper, allowed two restarts, restarts nothing: a restart would refuse the same way."""
    script = tmp_path / "loop.py"
    script.write_text(MISMATCHING_LOOP)
    first = subprocess.run([sys.executable, str(script), str(tmp_path / "save"), "4"], capture_output=True, text=True)
    assert first.returncode == 0 and "trained" in first.stdout, first.stderr
    alone = subprocess.run([sys.executable, str(script), str(tmp_path / "save"), "8"], capture_output=True, text=True)
    assert alone.returncode == 3, alone.stderr
    assert "batch_size: checkpoint has 4, this run has 8" in alone.stderr
    assert alone.stderr.rstrip().endswith("[telepathy] exit code 3 (cannot resume): running it again would fail "
                                          "the same way")  # fmt: skip
    wrapped = subprocess.run([*MAIN, "--save_dir", str(tmp_path / "save"), "--max_restarts", "2",
                              "--restart_backoff", "0.1", "--", sys.executable, str(script), str(tmp_path / "save"),
                              "8"], capture_output=True, text=True, timeout=120)  # fmt: skip
    out = wrapped.stdout + wrapped.stderr
    assert wrapped.returncode == 3, out[-3000:]
    assert out.count("batch_size: checkpoint has 4, this run has 8") == 1 and "restart 1/2" not in out  # one run
    assert "the trainer refused to run (exit code 3; see the log above); not run again" in out


SLOW_TO_EXIT = textwrap.dedent("""
    import os, sys, time
    import torch
    from telepathy import training_signals
    from telepathy.checkpointer import Checkpointer
    from telepathy.train_state import TrainState
    training_signals.install_signal_handlers()
    ckpt = Checkpointer(sys.argv[1], parts={"model": torch.nn.Linear(2, 2)}, interval=1000)
    state = ckpt.resume()
    print(f"trainer pid {os.getpid()}", flush=True)
    while True:
        time.sleep(0.02)
        state.advance()
        if ckpt.step_boundary(state):
            print("stop saved", flush=True)
            time.sleep(1.5)  # a slow teardown (data workers, a framework's own clean-up)
            sys.exit(training_signals.exit_code())
""")


def test_a_stop_the_trainer_saved_before_the_wrapper_heard_of_it_is_99(tmp_path):
    """SLURM signals every process of a job step: the trainer may commit its stop save before the wrapper's own
    SIGTERM arrives. That save is for this stop: 99, not 98."""
    script = tmp_path / "slow_exit.py"
    script.write_text(SLOW_TO_EXIT)
    proc = subprocess.Popen([*MAIN, "--save_dir", str(tmp_path / "save"), "--max_restarts", "0", "--",
                             sys.executable, str(script), str(tmp_path / "save")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("trainer pid "):
            os.kill(int(line.split()[-1]), signal.SIGTERM)  # to the trainer only, as SLURM does
        if line.startswith("stop saved"):
            proc.send_signal(signal.SIGTERM)  # the wrapper hears of it after the commit
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=60) == 99, out[-2000:]
    assert "nothing new saved" not in out


def test_a_stop_whose_save_failed_but_whose_last_step_was_rescued_exits_99(tmp_path):
    """The trainer got SIGTERM, its own save failed (exit 98), and the supervisor then committed the trainer's last
    step from shared memory: a resumable checkpoint was committed after the signal, so 99. A commit of any other
    kind after a trainer's 98 does not change its word."""
    import signal as signals
    import time as clock

    from telepathy.child import Outcome
    from telepathy.supervisor import Supervisor

    supervisor = Supervisor(["true"], tmp_path, grace_period=1)
    signalled = clock.time() - 5
    out = Outcome(code=98, ending=signals.SIGTERM, ending_at=signalled, aware=True, grace_killed=False, usr1_dropped=0)
    supervisor.last_commit, supervisor.last_commit_at = {"event": "save", "reason": "rescue:exit 98"}, clock.time()
    assert supervisor._stop_code(out) == 99
    supervisor.last_commit = {"event": "save", "reason": "interval"}
    assert supervisor._stop_code(out) == 98
    supervisor.last_commit_at = signalled - 1  # rescued, but before the signal: not for this stop
    supervisor.last_commit = {"event": "save", "reason": "rescue:SIGKILL"}
    assert supervisor._stop_code(out) == 98


@pytest.mark.parametrize("kind", ["pipe", "sh"])
def test_the_wrapper_waits_for_a_trainer_that_outlives_its_shell_and_tells_the_truth(tmp_path, kind):
    """`train | tee log` and `sh -c "train; echo"`: the shell may end before the trainer has saved. The wrapper
    waits for the trainer that shook hands, so its 99 comes with the checkpoint, and nothing runs on after it."""
    save_dir = tmp_path / "save"
    code, out = run(kind, save_dir, [signal.SIGTERM])
    assert code == 99 and SaveDir(save_dir).committed(), out[-2000:]
    left = subprocess.run(["pgrep", "-f", str(save_dir)], capture_output=True, text=True).stdout.split()
    assert not left, f"still running after the wrapper exited: {left}"


def test_sigusr1_through_a_pipe_saves_and_training_goes_on(tmp_path):
    """Before, SIGUSR1 went to the whole group: bash and tee died of it, the wrapper restarted the command, which
    found the live trainer's lock, and the pipeline's status (tee's 0) ended the job as complete."""
    save_dir = tmp_path / "save"
    code, out = run("pipe", save_dir, [signal.SIGUSR1, signal.SIGTERM])
    assert code == 99 and "reason: signal:SIGUSR1" in (tmp_path / "tee.log").read_text(), out[-2000:]
    assert "restart" not in out and "SaveDirBusy" not in out, out[-2000:]


def test_sigterm_after_the_trainer_completed_is_exit_0(tmp_path):
    code, out = run("aware_short", tmp_path, [signal.SIGTERM], wait_for="training complete")
    assert code == 0, out[-2000:]


def test_a_stop_signal_during_the_restart_backoff_stops_at_once_and_starts_nothing(tmp_path):
    fails = [sys.executable, "-c", "import time, sys; print('iteration 0', flush=True); time.sleep(1); sys.exit(1)"]
    proc = subprocess.Popen([*MAIN, "--save_dir", str(tmp_path), "--grace_period", "10", "--restart_backoff", "60",
                             "--", *fails], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = ""
    for line in proc.stdout:
        out += line
        if "restart 1/" in line:
            break
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out += proc.stdout.read()
    assert proc.wait(timeout=60) == 98 and time.monotonic() - started < 10, out[-2000:]
    assert "while waiting to restart" in out and out.count("iteration 0") == 1, out[-2000:]


@pytest.mark.parametrize("script", ["#!/nonexistent/python\nprint(1)\n", "print(1)\n"])
def test_a_command_that_cannot_be_started_is_one_line_and_exit_2(tmp_path, script):
    path = tmp_path / "train.sh"
    path.write_text(script)
    path.chmod(0o755)
    done = subprocess.run([*MAIN, "--save_dir", str(tmp_path / "save"), "--", str(path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert f"cannot start {str(path)!r}" in done.stdout


@pytest.mark.parametrize(("flag", "value"), [("--restart_backoff", "1e308"), ("--grace_period", "1e12")])
def test_absurd_wrapper_durations_are_refused_at_parse_time(tmp_path, flag, value):
    done = subprocess.run([*MAIN, "--save_dir", str(tmp_path), flag, value, "--", "true"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "must be at most" in done.stderr and "Traceback" not in done.stderr


def test_a_dataset_file_that_is_not_squad_is_a_usage_error_not_three_tracebacks(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1}')
    done = subprocess.run([*MAIN, "--save_dir", str(tmp_path / "save"), "--dataset", str(bad), "--epochs", "1",
                           "--samples", "8"], capture_output=True, text=True, timeout=300)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in out and "not a readable SQuAD-format" in out, out[-2000:]
    assert "restart" not in out


def test_of_two_stop_signals_held_during_start_up_the_first_decides(tmp_path):
    """Released together, pending signals are handled lowest number first: SIGINT (2) would overtake an earlier
    SIGTERM (15). Only the first stop signal is passed on."""
    wrapped = [*MAIN, "--save_dir", str(tmp_path), "--grace_period", "30", "--", *aware(tmp_path)]
    proc = subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 99 and "reason: signal:SIGTERM" in out, out[-2000:]


def test_a_trainer_under_torchrun_that_commits_for_the_stop_is_99(tmp_path):
    """torchrun starts its workers with close_fds: no handshake and no report reach the wrapper. The checkpoint the
    worker commits for the signal is found in the save dir (before: exit 98, "nothing new saved", beside it)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                *aware(tmp_path)[2:]]  # fmt: skip
    proc = subprocess.Popen([*MAIN, "--save_dir", str(tmp_path), "--grace_period", "60", "--", *torchrun],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = ""
    for line in proc.stdout:
        out += line
        if line.startswith("step 3 "):
            break
    proc.send_signal(signal.SIGTERM)
    out += proc.stdout.read()  # (the same stream: communicate would skip what it has buffered)
    assert proc.wait(timeout=180) == 99 and SaveDir(tmp_path).committed(), out[-3000:]
    assert "nothing new saved" not in out


def test_a_report_descriptor_that_is_not_the_supervisors_pipe_is_never_written(tmp_path, monkeypatch):
    """In a launcher's worker the inherited number may name one of its own files or sockets."""
    from telepathy import training_signals
    from telepathy.disk.events import EventLog

    with open(tmp_path / "unrelated.bin", "wb") as unrelated:
        monkeypatch.setenv(training_signals.REPORT_FD_ENV, str(unrelated.fileno()))
        training_signals._tell_supervisor()
        EventLog(tmp_path / "save", "trainer").emit("save", step=1)
    assert (tmp_path / "unrelated.bin").read_bytes() == b""
    read, write = os.pipe()
    monkeypatch.setenv(training_signals.REPORT_FD_ENV, str(write))
    training_signals._tell_supervisor()
    os.close(write)
    assert b'"handlers"' in os.read(read, 4096)
    os.close(read)


@pytest.mark.parametrize("kind", ["sh", "pipe"])
def test_a_trainer_behind_a_shell_saves_and_stops_when_the_wrapper_is_killed(tmp_path, kind):
    """`kill -9` of the wrapper: its direct child (the shell) dies with it, the trainer behind it is nobody's child
    and hears of it only by the report pipe closing; it must save and stop, not train on unsupervised."""
    save_dir = tmp_path / "save"
    proc = subprocess.Popen([*MAIN, "--save_dir", str(save_dir), "--grace_period", "20", "--max_restarts", "0", "--",
                             *command(kind, save_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any(line.startswith("step 3 ") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.02)
    trainer = int(next(line for line in lines if line.startswith("PID ")).split()[1])
    proc.kill()
    proc.wait(timeout=30)
    assert _gone_within(trainer, 90), "the trainer trains on without its wrapper"
    reader.join(timeout=10)
    out = "".join(lines)
    assert "the supervising wrapper is gone" in out and "checkpoint committed" in out, out[-2000:]
    assert SaveDir(save_dir).committed()[-1].step >= 3, out[-2000:]


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` ends within ``seconds``; SIGKILLed if not (a failing test leaves nothing behind)."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _alive(pid):
        return True
    os.kill(pid, signal.SIGKILL)
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


HANGS_ON_TERM = textwrap.dedent("""
    import os, signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a save that hangs, as far as the wrapper can tell
    print(f"worker {os.getpid()}", flush=True)
    time.sleep(3600)
""")


def test_at_grace_expiry_a_torchrun_worker_in_a_session_of_its_own_is_killed_too(tmp_path):
    """The group SIGKILL misses a launcher's worker in a session of its own, which then trained on unsupervised.
    The wrapper is a child subreaper and kills every descendant."""
    script = tmp_path / "hangs.py"
    script.write_text(HANGS_ON_TERM)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)]
    proc = subprocess.Popen([*MAIN, "--save_dir", str(tmp_path / "save"), "--grace_period", "3", "--max_restarts",
                             "0", "--", *torchrun], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # (a survivor keeps it open)
    reader.start()
    deadline = time.monotonic() + 120
    while not any(line.startswith("worker ") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    worker = int(next(line for line in lines if line.startswith("worker ")).split()[1])
    time.sleep(HANDSHAKE_SETTLE)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    assert _gone_within(worker, 10), "the worker survived the grace period's kill"
    assert code == 98, "".join(lines)[-3000:]


HANDSHAKE_SETTLE = 1.0  # seconds: past torchrun's own start-up, so the SIGTERM meets a running worker
