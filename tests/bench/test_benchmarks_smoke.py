"""Benchmarks that cannot rot (issue 13): every script in benchmarks/ runs end to end at a tiny size, and a bad
``--dir`` is refused in one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TABLE_HEADERS = {  # script -> the header of each table it prints
    "checkpoint_bench.py": [
        "| compression (zstd level 3, byte planes) | fp32 ratio | bf16 ratio |",
        "| write | blocking s | durable s | GB/s | durable / dd | blocking / torch.save |",
        "| seconds | verify s | extra peak RSS / state | x dd read |",
    ],
    "commit_cost.py": [
        "| step of Checkpointer.save (sync) | ms | share of save | fsyncs | fsync ms |",
        "| same state, same loop | ms | whole save / this |",
    ],
    "gpu_bench.py": [  # without a GPU: these headers with "no GPU" rows
        "| snapshot of the state (GPU to host) | blocking ms | GB/s | x pinned copy floor | durable s |",
        "| training loop on the GPU | ms/step | x no protection | in step_boundary ms/step | saves committed |",
    ],
    "hard_kill_bench.py": [
        "| main job (LatentWire default) | ms/step after start-up | x no protection | x no protection, same round",
        "| `--snapshot_every_step`, same process, alternated blocks of 3 steps | pairs of blocks | ms/step with",
        "| in-process loop, state of model + AdamW | ms/step | overhead ms/step | overhead / the bare copy's |",
        "| SIGKILL at a random instant | kills | steps replayed, median | max | bit-identical to an uninterrupted",
    ],
    "writer_bench.py": [
        "| writer | ms/step | x no saves | overhead ms/step | loop blocked per save ms | saves committed |",
    ],
}


def run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_every_benchmark_is_smoke_tested() -> None:
    assert sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")) == sorted(TABLE_HEADERS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TABLE_HEADERS))
def test_smoke_run_prints_its_tables(script: str, tmp_path: Path) -> None:
    done = run(script, "--smoke", "--dir", str(tmp_path), timeout=300)
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout}\n{done.stderr}"
    for header in TABLE_HEADERS[script]:
        assert header in done.stdout, f"{script} --smoke printed no table {header!r}:\n{done.stdout}"
    assert "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind in --dir"


@pytest.mark.parametrize("script", sorted(TABLE_HEADERS))
@pytest.mark.parametrize("bad", ["missing", "a file"])
def test_bad_dir_is_one_line_and_exit_2(script: str, bad: str, tmp_path: Path) -> None:
    top = Path("/nonexistent")
    if bad == "missing":
        target = top / "deeper" / "x"
        if top.exists():
            pytest.skip(f"{top} exists on this machine")
    else:
        target = tmp_path / "file"
        target.write_text("not a directory\n")
    done = run(script, "--smoke", "--dir", str(target), timeout=120)
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not (bad == "missing" and top.exists()), "the benchmark created --dir (or its parents): it must refuse"
