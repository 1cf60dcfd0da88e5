"""The supervisor's reach over processes (from a review): at grace expiry it kills the run's whole tree and nothing
else; it reaps orphans handed to it and never a child of the program that runs it in-process; it gives back the
program's own subreaper setting. Run in a child interpreter: it becomes a subreaper and receives a SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

PROGRAM = textwrap.dedent("""
    import ctypes, json, os, signal, subprocess, sys, threading, time
    from telepathy.process_tree import _set_subreaper, _subreaper
    from telepathy.supervisor import Supervisor

    _set_subreaper(True)  # the program's own setting, to be given back
    bystander = subprocess.Popen(["sleep", "300"])  # the program's child from before the run
    during = {}
    def start_one_during_the_run():
        time.sleep(1.0)
        during["proc"] = subprocess.Popen(["sh", "-c", "exit 7"])  # the program's child, started meanwhile
    threading.Thread(target=start_one_during_the_run).start()
    os.environ["SUPERVISOR_PID"] = str(os.getpid())
    hangs = os.path.join(os.path.dirname(sys.argv[1]), "hangs_on_term.py")
    with open(hangs, "w") as f:  # asks its supervisor to stop, then hangs
        f.write("import os, signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                "os.kill(int(os.environ['SUPERVISOR_PID']), signal.SIGTERM)\\ntime.sleep(3600)\\n")
    command = ["sh", "-c", f"{sys.executable} {hangs} & wait"]  # behind a shell: the trainer is a grandchild
    code = Supervisor(command, sys.argv[1], grace_period=3.0).run()
    time.sleep(0.5)
    print(json.dumps({
        "code": code,
        "bystander_alive": bystander.poll() is None,
        "during_exit": during["proc"].wait(timeout=10),
        "subreaper_after": _subreaper(),
    }))
    bystander.kill()
""")


def test_grace_expiry_kills_the_runs_tree_and_spares_the_programs_own_children(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "save")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 98, result  # killed at grace expiry, nothing saved
    assert result["bystander_alive"], "the program's own child was killed"
    assert result["during_exit"] == 7, "the program's child's exit status was reaped by the supervisor"
    assert result["subreaper_after"] is True, "the program's subreaper setting was not given back"
    survivors = subprocess.run(["pgrep", "-f", str(tmp_path / "hangs_on_term.py")], capture_output=True,
                               text=True).stdout.split()  # fmt: skip
    assert not survivors, f"the run's trainer survived the grace period: {survivors}"
