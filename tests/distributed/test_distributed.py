"""Real torch.distributed (gloo, ``torchrun``, 2 processes on this machine's CPUs): ranks agree on signals, save
together, commit only when every rank's files are durable, and resume bit-identically at the same world size;
sharded (FSDP2) state resumes on another world size through DCP."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SUBMIT, log_of, release_when_requeued, wait_for, wait_until_finished  # noqa: F401

from telepathy.store.checkpoint_store import CheckpointStore

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parents[1] / "helpers" / "dist_worker.py"
STEP = re.compile(r"rank (\d+) step (\d+) loss (0x[0-9a-fp.+-]+) samples ([0-9,]+)")
EXIT = re.compile(r"rank (\d+) exits (\d+) at step (\d+)")


class Run:
    """One ``torchrun`` of the worker; ``steps`` maps (rank, step) to (loss hex, samples) — the last time
    that step ran, so steps replayed after a resume count once."""

    def __init__(self, save_dir: Path, nproc: int = 2, *args: str, env: dict | None = None) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(WORKER), str(save_dir), *args]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})  # fmt: skip
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}

    def read_until(self, predicate) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            for rank, pid in re.findall(r"rank (\d+) pid (\d+)", line):  # ranks share the pipe: lines may merge
                self.pids[int(rank)] = int(pid)
            if predicate(line):
                return
        raise AssertionError("the run ended before the awaited line:\n" + self.output[-3000:])

    def finish(self, timeout: float = 180) -> Run:
        """Wait for the run and keep the rest of its output. Read through the same text stream as ``read_until``:
        ``communicate`` reads the pipe itself and would lose the lines that stream had already buffered (a step
        line of the other rank that arrived with the awaited one went missing on a loaded machine)."""
        reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        reader.start()
        self.proc.wait(timeout=timeout)
        reader.join(timeout=60)
        assert not reader.is_alive(), "the run's output never ended"
        return self

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def exits(self) -> dict[int, tuple[int, int]]:
        return {int(r): (int(code), int(step)) for r, code, step in EXIT.findall(self.output)}

    def steps(self) -> dict[tuple[int, int], tuple[str, str]]:
        return {(int(r), int(s)): (loss, samples) for r, s, loss, samples in STEP.findall(self.output)}


def reached(rank: int, step: int):
    return lambda line: any(int(s) >= step for s in re.findall(rf"rank {rank} step (\d+)", line))


def final_model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_model.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-rank runs, DDP (with dropout: per-rank random streams) and FSDP (without)."""
    results = {}
    for mode, extra in (("ddp", []), ("fsdp", ["--dropout", "0"])):
        out = tmp_path_factory.mktemp(f"reference-{mode}")
        run = Run(out / "save", 2, "--mode", mode, "--out", str(out), *extra).finish()
        assert run.exits() == {0: (0, 32), 1: (0, 32)}, run.output[-3000:]
        results[mode] = (final_model(out), run.steps())
    return results


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_is_bit_identical(tmp_path, reference):
    ref_model, ref_steps = reference["ddp"]
    run = Run(tmp_path / "save", 2, "--out", str(tmp_path), "--delay", "0.05")
    run.read_until(lambda line: reached(1, 6)(line) and len(run.pids) == 2)
    os.kill(run.pids[1], signal.SIGTERM)  # rank 1 only
    run.finish()
    stops = run.exits()
    assert stops.keys() == {0, 1} and stops[0] == stops[1] and stops[0][0] == 99, run.output[-3000:]
    ref, manifest = CheckpointStore(tmp_path / "save").newest_valid()
    assert ref.step == stops[0][1] and manifest["reason"] == "signal:SIGTERM" and manifest["world_size"] == 2
    assert {"rank_00000.pt", "rank_00001.pt", "model.pt", "optimizer.pt", "state.pt"} <= set(manifest["files"])
    rng = [torch.load(ref.path / f"rank_0000{r}.pt", weights_only=True)["rng"]["torch_cpu"] for r in (0, 1)]
    assert not torch.equal(*rng)  # each rank's own random stream is in the checkpoint

    resumed = Run(tmp_path / "save", 2, "--out", str(tmp_path)).finish()
    assert resumed.exits() == {0: (0, 32), 1: (0, 32)}, resumed.output[-3000:]
    assert_same_weights(final_model(tmp_path), ref_model)
    steps = {**run.steps(), **resumed.steps()}
    assert steps == ref_steps  # every step's loss on every rank, bit for bit, and the same samples


def test_sigkill_of_one_rank_during_a_save_commits_nothing_and_the_run_resumes(tmp_path, reference):
    """SIGUSR1 asks for a save (training goes on); a second one's save is stretched by the test hook and
    rank 1 is killed in it: rank 0 must not commit a checkpoint that lacks rank 1's files."""
    ref_model, ref_steps = reference["ddp"]
    save = tmp_path / "save"
    run = Run(save, 2, "--out", str(tmp_path), "--delay", "0.05", env={"TELEPATHY_TEST_SAVE_STEP_PAUSE": "0.5"})
    run.read_until(lambda line: reached(0, 3)(line) and len(run.pids) == 2)
    os.kill(run.pids[0], signal.SIGUSR1)
    run.read_until(lambda line: "rank 0 step" in line and (save / "latest").exists())
    first = CheckpointStore(save).newest_valid()[0].step
    os.kill(run.pids[0], signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-step") for p in (save / "checkpoints").iterdir()):
        assert time.monotonic() < deadline, "the second save never started"
        time.sleep(0.005)
    os.kill(run.pids[1], signal.SIGKILL)  # while it writes (and pauses in) its rank file
    run.finish()
    assert run.proc.returncode != 0
    assert [r.step for r in CheckpointStore(save).committed()] == [first], run.output[-3000:]
    assert any(p.name.startswith(".tmp-step") for p in (save / "checkpoints").iterdir())  # the torn save

    resumed = Run(save, 2, "--out", str(tmp_path)).finish()
    assert resumed.exits() == {0: (0, 32), 1: (0, 32)}, resumed.output[-3000:]
    assert not any(p.name.startswith(".tmp-") for p in (save / "checkpoints").iterdir())  # cleaned up
    assert_same_weights(final_model(tmp_path), ref_model)
    assert {**run.steps(), **resumed.steps()} == ref_steps


def test_sharded_fsdp_resumes_bit_identically_and_on_another_world_size(tmp_path, reference):
    ref_model, ref_steps = reference["fsdp"]
    run = Run(tmp_path / "save", 2, "--mode", "fsdp", "--dropout", "0", "--delay", "0.05")
    run.read_until(lambda line: reached(0, 10)(line) and len(run.pids) == 2)
    os.kill(run.pids[0], signal.SIGTERM)
    run.finish()
    assert {code for code, _ in run.exits().values()} == {99}, run.output[-3000:]
    ref, manifest = CheckpointStore(tmp_path / "save").newest_valid()
    assert manifest["sharded"] and {"__0_0.distcp", "__1_0.distcp", "sharded.metadata"} <= set(manifest["files"])
    assert "model.pt" not in manifest["files"]
    shutil.copytree(tmp_path / "save", tmp_path / "to_one")

    same = Run(tmp_path / "save", 2, "--mode", "fsdp", "--dropout", "0", "--out", str(tmp_path)).finish()
    assert same.exits() == {0: (0, 32), 1: (0, 32)}, same.output[-3000:]
    assert_same_weights(final_model(tmp_path), ref_model)
    assert {**run.steps(), **same.steps()} == ref_steps

    (tmp_path / "one").mkdir()
    one = Run(tmp_path / "to_one", 1, "--mode", "fsdp", "--dropout", "0", "--out", str(tmp_path / "one")).finish()
    assert one.exits() == {0: (0, 32)}, one.output[-3000:]
    assert "written by 2 rank(s) with 1" in one.output and "not bit-identically" in one.output
    assert_same_weights(final_model(tmp_path / "one"), ref_model, exact=False)
    for step in range(ref.step + 1, 33):  # the same global batches, in the same order, now on one rank
        ref_samples = ref_steps[(0, step)][1] + "," + ref_steps[(1, step)][1]
        assert one.steps()[(0, step)][1] == ref_samples


def test_sharded_resume_from_one_rank_to_two(tmp_path, reference):
    ref_model, _ = reference["fsdp"]
    run = Run(tmp_path / "save", 1, "--mode", "fsdp", "--dropout", "0", "--delay", "0.05")
    run.read_until(reached(0, 12))
    os.kill(run.proc.pid, signal.SIGTERM)  # torchrun forwards it to its worker
    run.finish()
    assert run.exits() == {0: (99, run.exits()[0][1])}, run.output[-3000:]
    two = Run(tmp_path / "save", 2, "--mode", "fsdp", "--dropout", "0", "--out", str(tmp_path)).finish()
    assert two.exits() == {0: (0, 32), 1: (0, 32)}, two.output[-3000:]
    assert "written by 1 rank(s) with 2" in two.output
    assert_same_weights(final_model(tmp_path), ref_model, exact=False)


def test_agreement_cost_is_reported(tmp_path):
    """Not a timing assertion: the figure goes into the closing note and README (measured side by side)."""
    run = Run(tmp_path / "save", 2, "--time_agreement", "--epochs", "0").finish()
    costs = [int(us) for us in re.findall(r"agree_us (\d+)", run.output)]
    assert len(costs) == 2 and all(us > 0 for us in costs), run.output[-3000:]
    print(f"per-step agreement: {costs} microseconds per rank")


@pytest.mark.slurm
@pytest.mark.usefixtures("cluster")
def test_srun_two_ranks_under_the_submit_script_preempted_requeued_bit_identical(reference, tmp_path):
    """``sbatch -n 2``: the submit script runs COMMAND as two srun tasks (ranks from SLURM_PROCID); a job on the
    high partition preempts it, both ranks save and exit 99, the script requeues, the job finishes identical."""
    ref_model, ref_steps = reference["ddp"]
    env = {**os.environ, "SAVE_DIR": str(tmp_path / "save"), "PYTHON": sys.executable,
           "COMMAND": f"{sys.executable} {WORKER} {tmp_path / 'save'} --delay 0.45 --out {tmp_path}"}  # fmt: skip
    done = subprocess.run(["sbatch", "--parsable", "-p", "low", "-n", "2", "-c", "1", str(SUBMIT)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    job_id = done.stdout.strip().split(";")[0]
    wait_for(lambda: "rank 1 step 3 " in log_of(job_id), 120, "both ranks to train")
    subprocess.run(["sbatch", "-p", "high", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 1"], check=True)
    release_when_requeued(job_id)
    final = wait_until_finished(job_id)
    log = log_of(job_id)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, log[:3000])
    assert "was preempted and saved; requeuing it (restart 1" in log
    stops = EXIT.findall(log.split("restart 1")[0])
    assert {r for r, _, _ in stops} == {"0", "1"} and {(c, s) for _, c, s in stops} == {("99", stops[0][2])}, log
    assert_same_weights(final_model(tmp_path), ref_model)
    assert {(int(r), int(s)): (loss, samples) for r, s, loss, samples in STEP.findall(log)} == ref_steps
