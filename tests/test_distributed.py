"""Real torch.distributed (gloo, torchrun, 2 processes): a signal to one rank stops every rank at the same
step, after the writer committed a checkpoint of that step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from telepathy.checkpoint_store import CheckpointStore
from telepathy.manifest import read_manifest

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tmp_path), "400", "0.02"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for rank, pid in re.findall(r"rank (\d) pid (\d+)", line):  # two ranks share the pipe: lines may merge
            pids[int(rank)] = int(pid)
        if any(int(step) >= 10 for step in re.findall(r"rank 1 step (\d+)", line)) and len(pids) == 2:
            os.kill(pids[1], signal.SIGTERM)  # rank 1 only
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    exits = re.findall(r"rank (\d) exits (\d+) at step (\d+)", output)
    stops = {int(rank): (int(code), int(step)) for rank, code, step in exits}
    assert stops.keys() == {0, 1} and stops[0] == stops[1] and stops[0][0] == 99, output[-3000:]
    ref, manifest = CheckpointStore(tmp_path).newest_valid()
    assert ref.step == stops[0][1] and manifest["reason"] == "signal:SIGTERM"
    assert read_manifest(ref.path)["step"] == ref.step
    assert proc.returncode != 0  # torchrun reports the ranks' non-zero exits
