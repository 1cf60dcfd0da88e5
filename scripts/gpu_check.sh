#!/usr/bin/env bash
# The whole GPU story in one go, for anyone with one GPU for a few minutes:
#
#     bash scripts/gpu_check.sh            # from the repository root or anywhere; about 5-8 minutes on one GPU
#
# 1. installs what is missing (pip install -e ".[test]"; an installed torch, CUDA build or not, is kept as it is);
# 2. runs the `cuda` tests (tests/gpu: bit-identical resume under SIGTERM, SIGUSR1 and SIGKILL, async snapshots,
#    bf16/fp16 autocast with GradScaler, a pinned DataLoader with workers, LatentWire --device cuda, per-step
#    protection, NCCL) and benchmarks/gpu_bench.py, each under a time limit so that the whole stays under 8 minutes;
# 3. prints one summary table: the test outcome counts (and the failures by name), then the benchmark's tables.
#
# Two ranks on one GPU cannot use NCCL (it refuses two ranks on the same device), so the NCCL test runs one rank
# (world size 1); several ranks are covered by tests/distributed with gloo on CPUs.
#
# Without a GPU (torch.cuda.is_available() is False), or with GPU_CHECK_DRY_RUN=1, it is a dry run: it says
# "no GPU: dry run", checks that the cuda tests collect (pytest --collect-only -m cuda tests/gpu), says how many, and
# exits 0. Logs and the JUnit report go to GPU_CHECK_OUT (default: a new temporary directory). Exit status: 0 when
# every cuda test passed and the benchmark ran, else 1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t telepathy-gpu-check-XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's telepathy, even where pip cannot install
export CUBLAS_WORKSPACE_CONFIG=:4096:8              # deterministic cuBLAS, before any process starts CUDA

needs='import pytest, telepathy, transformers, tokenizers, xxhash, zstandard, filelock, tqdm, numpy'
if ! "$PY" -c "$needs" 2>/dev/null; then
    pins=()
    if torch_version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
        echo "torch==$torch_version" >"$OUT/keep-torch.txt"  # pip may add packages, never replace this torch
        pins=(-c "$OUT/keep-torch.txt")
    fi
    echo "installing the test dependencies (pip install -e \".[test]\" ${pins[*]})"
    "$PY" -m pip install -q -e ".[test]" ${pins[@]+"${pins[@]}"} || echo "pip install failed (offline?); using what is installed"
fi

if [[ ${GPU_CHECK_DRY_RUN:-0} != 1 ]] && [[ $("$PY" -c 'import torch; print(torch.cuda.is_available())') == True ]]; then
    gpu=1
else
    gpu=0
fi

if [[ $gpu == 0 ]]; then
    echo "no GPU: dry run (torch.cuda.is_available() is False or GPU_CHECK_DRY_RUN=1): checking that the cuda tests collect"
    if ! "$PY" -m pytest --collect-only -q -m cuda tests/gpu -p no:cacheprovider >"$OUT/collect.log" 2>&1; then
        cat "$OUT/collect.log"
        echo "the cuda tests do not collect"
        exit 1
    fi
    collected=$(grep -c '::' "$OUT/collect.log" || true)
    if [[ $collected == 0 ]]; then
        cat "$OUT/collect.log"
        echo "no cuda test collected"
        exit 1
    fi
    echo
    echo "| GPU check (dry run) | outcome |"
    echo "|---|---|"
    echo "| cuda tests | $collected collected, not run (no GPU) |"
    echo "| benchmarks/gpu_bench.py | not run (no GPU) |"
    if [[ -z ${GPU_CHECK_OUT:-} ]]; then
        rm -rf "$OUT"  # nothing worth keeping
    fi
    exit 0
fi

device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "|", torch.cuda.device_count(), "visible")')
versions=$("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")')
echo "GPU: $device; $versions; logs in $OUT"

started=$SECONDS
tests_rc=0
timeout --signal=TERM --kill-after=15 300 "$PY" -m pytest -m cuda tests/gpu -q -p no:cacheprovider \
    --junitxml="$OUT/cuda-tests.xml" >"$OUT/cuda-tests.log" 2>&1 || tests_rc=$?
tests_s=$((SECONDS - started))
tail -n 25 "$OUT/cuda-tests.log"

started=$SECONDS
bench_rc=0
timeout --signal=TERM --kill-after=15 140 "$PY" benchmarks/gpu_bench.py --dir "$OUT" --state_mib 1024 \
    --loop_mib 128 >"$OUT/gpu-bench.md" 2>"$OUT/gpu-bench.err" || bench_rc=$?
bench_s=$((SECONDS - started))

echo
echo "== GPU check: $device; $versions =="
echo
"$PY" - "$OUT/cuda-tests.xml" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

report, tests_rc, tests_s, bench_rc, bench_s = sys.argv[1], *map(int, sys.argv[2:])
counts, failed = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}, []
if Path(report).is_file():
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "errors"}.get(outcome, outcome)
        counts[key] += 1
        if key in ("failed", "errors"):
            failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
timed_out = " (timed out)" if tests_rc == 124 else ""
print("| GPU check | outcome |")
print("|---|---|")
print(f"| cuda tests | {', '.join(f'{n} {k}' for k, n in counts.items())} in {tests_s} s, exit {tests_rc}{timed_out} |")
for name in failed:
    print(f"| failed | {name} |")
print(f"| benchmarks/gpu_bench.py | exit {bench_rc}{' (timed out)' if bench_rc == 124 else ''} in {bench_s} s |")
EOF
echo
grep -E '^(##|\|)' "$OUT/gpu-bench.md" || tail -n 20 "$OUT/gpu-bench.err"
[[ $tests_rc == 0 && $bench_rc == 0 ]]
