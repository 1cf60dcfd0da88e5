"""``scripts/gpu_check.sh`` must work where there is no GPU too: a dry run that says so, checks that the ``cuda`` tests
collect, reports how many, and exits 0 (forced with GPU_CHECK_DRY_RUN=1, so that this test never starts the full GPU
check on a machine with a GPU)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cuda_test_count() -> int:
    """The ``cuda``-marked tests in tests/gpu, counted from the source (parametrised ones once per case)."""
    count = 0
    for path in sorted((ROOT / "tests" / "gpu").glob("test_cuda_*.py")):
        text = path.read_text()
        assert "pytest.mark.cuda" in text, f"{path.name} is not marked cuda"
        count += len(re.findall(r"^def test_", text, flags=re.M))
    from test_cuda_resume import SCHEDULES  # noqa: PLC0415 (tests/gpu is on sys.path while its tests run)

    return count + len(SCHEDULES) - 1  # test_signals_resume_bit_identically_on_cuda runs once per schedule


@pytest.mark.slow
def test_dry_run_without_a_gpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "no GPU: dry run" in out
    found = re.search(r"\| cuda tests \| (\d+) collected, not run \(no GPU\) \|", out)
    assert found, out
    assert int(found.group(1)) == cuda_test_count(), out


def test_the_script_is_strict_bash():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0  # it parses
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "NCCL" in text and "world size 1" in text  # why the NCCL test runs one rank
