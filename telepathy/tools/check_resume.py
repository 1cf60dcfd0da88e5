"""``telepathy check-resume -- COMMAND ... {save_dir} ...``: does this training command resume bit-identically?

Runs the command three times into fresh save dirs: uninterrupted; stopped by SIGTERM at one step and rerun until it
finishes; killed by SIGKILL at another step and rerun. Every step's metric (what the loop passes to
``step_boundary``, recorded exactly through ``TELEPATHY_STEP_LOG``) and the final checkpoint's tensors are compared.
Prints "bit-identical", or the first step that differs, what differs (weights, optimizer, RNG, other state) and the
likely cause. Exit 0 identical, 1 different, 2 the command could not be checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telepathy.step_log import STEP_HOLD_ENV, STEP_LOG_ENV, read_steps

PLACEHOLDER = "{save_dir}"


@dataclass
class Trial:
    name: str
    steps: dict[int, list[str | None]] = field(default_factory=dict)  # step -> metric (hex) of every run of it
    resumed_at: list[int] = field(default_factory=list)  # the step each rerun started after
    save_dir: Path = Path()


def run_trial(name: str, command: list[str], work: Path, interrupt: tuple[int, int] | None, timeout: float) -> Trial:
    """Run ``command`` to completion; with ``interrupt`` (signal, step) send the signal once that step is logged
    (the loop holds at that step until it arrives: ``TELEPATHY_STEP_HOLD``)."""
    trial = Trial(name, save_dir=work / name)
    log = work / f"{name}.steps"
    argv = [a.replace(PLACEHOLDER, str(trial.save_dir)) for a in command]
    env = {**os.environ, STEP_LOG_ENV: str(log)}
    env.pop(STEP_HOLD_ENV, None)
    pending = interrupt
    for attempt in range(6):
        before = len(read_steps(log))
        hold = {STEP_HOLD_ENV: str(pending[1])} if pending is not None else {}
        errors = open(work / f"{name}.stderr", "w+b")  # (a file, not a pipe: a chatty command must not block on it)
        try:
            proc = subprocess.Popen(argv, env={**env, **hold}, stdout=subprocess.DEVNULL, stderr=errors,
                                    start_new_session=True)  # fmt: skip
        except OSError as exc:
            errors.close()
            raise RuntimeError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"{name}: the command ran past {timeout:.0f} s")
            if pending is not None and any(r.get("step", 0) >= pending[1] for r in read_steps(log)[before:]):
                os.killpg(proc.pid, pending[0])
                pending = None
            time.sleep(0.02)
        errors.seek(max(0, errors.seek(0, os.SEEK_END) - 2000))
        stderr = errors.read().decode(errors="replace")
        errors.close()
        records = read_steps(log)[before:]
        if attempt and records:
            trial.resumed_at.append(records[0]["step"] - 1)
        for record in records:
            trial.steps.setdefault(record["step"], []).append(record["metric"])
        if proc.returncode == 0 and pending is None:
            return trial
        if proc.returncode not in (0, 98, 99, 130, -signal.SIGKILL, -signal.SIGTERM):
            raise RuntimeError(f"{name}: the command exited {proc.returncode}:\n{stderr}")
    raise RuntimeError(f"{name}: the command did not finish in 6 runs")


def first_difference(reference: Trial, trial: Trial) -> int | None:
    for step in sorted(reference.steps):
        expected = reference.steps[step][0]
        if any(value != expected for value in trial.steps.get(step, [None])):
            return step
    return None


def final_differences(reference: Trial, trial: Trial) -> list[str]:
    """Which parts of the final checkpoints differ: weights (per part), optimizer, RNG, other state."""
    from telepathy.disk.catalog import Catalog  # noqa: PLC0415
    from telepathy.disk.contents import part_name  # noqa: PLC0415
    from telepathy.disk.save_dir import SaveDir  # noqa: PLC0415
    from telepathy.store.formats import load_part  # noqa: PLC0415

    found = [Catalog(SaveDir(t.save_dir)).newest_valid() for t in (reference, trial)]
    if None in found:
        return ["no final checkpoint to compare"]
    dirs = [f[0].path for f in found]
    names = sorted({part_name(n) for n in found[0][1]["files"]} - {None})
    out = []
    for name in names:
        a, b = (load_part(d, name) if (d / f"{name}.pt").is_file() else None for d in dirs)
        if name == "state":
            ra, rb = a.get("rng") or {}, b.get("rng") or {}
            out += [f"RNG: {k}" for k in sorted(set(ra) | set(rb)) if not _equal(ra.get(k), rb.get(k))]
            rest = [k for k in a if k not in ("rng", "timestamp", "metadata") and not _equal(a[k], b.get(k))]
            out += [f"training state: {k}" for k in rest]
        elif not _equal(a, b):
            out.append("optimizer" if name == "optimizer" else f"weights of {name!r}")
    return out


def _equal(a: Any, b: Any) -> bool:
    import torch  # noqa: PLC0415

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()
    return a == b


def likely_cause(step: int, resumed_at: list[int], differs: list[str]) -> str:
    causes = []
    if any(step == r + 1 for r in resumed_at):
        causes.append("the first step after a resume differs: something that step uses is not in the checkpoint — a "
                      "prefetched batch, a data iterator's position, a counter, an extra torch.Generator (pass it as "
                      "generators=), or state a script re-creates after resuming (re-seeding the RNG)")  # fmt: skip
    if any(d.startswith("RNG") for d in differs):
        causes.append("the RNG states differ at the end: random draws come from somewhere the checkpoint does not "
                      "restore, or the script re-seeds after the resume")  # fmt: skip
    if not causes:
        causes.append("the difference starts after the resume point: look for state that drifts (a learning-rate "
                      "schedule stepped by wall time, a thread count that differs between runs)")  # fmt: skip
    return "; ".join(causes)


def check(command: list[str], sigterm_at: int, sigkill_at: int, timeout: float = 600) -> tuple[list[str], int]:
    if not any(PLACEHOLDER in a for a in command):
        return [f"the command must contain {PLACEHOLDER} where its save dir goes (each run gets a fresh one)"], 2
    with tempfile.TemporaryDirectory(prefix="telepathy-check-") as tmp:
        work = Path(tmp)
        try:
            reference = run_trial("uninterrupted", command, work, None, timeout)
            if not reference.steps:
                return ["the command logged no steps: does it call Checkpointer.step_boundary (or "
                        "PreemptibleRun.step_done) with metric=?"], 2  # fmt: skip
            last = max(reference.steps)
            if max(sigterm_at, sigkill_at) >= last:
                return [f"--sigterm_at {sigterm_at} and --sigkill_at {sigkill_at} must be steps before the last one "
                        f"({last}) of the uninterrupted run, or nothing is resumed to compare"], 2  # fmt: skip
            trials = [run_trial("sigterm", command, work, (signal.SIGTERM, sigterm_at), timeout),
                      run_trial("sigkill", command, work, (signal.SIGKILL, sigkill_at), timeout)]  # fmt: skip
        except RuntimeError as exc:
            return [f"could not check: {exc}"], 2
        lines, failed = [], False
        for trial in trials:
            if not any(step > 0 for step in trial.resumed_at):  # nothing after a resume was tested
                return [f"could not check: the {trial.name} run was never resumed from a checkpoint (it ended before "
                        "the signal, its rerun logged no steps, or it started over: no checkpoint before the "
                        "signal; pick a later step or save more often)"], 2  # fmt: skip
            step = first_difference(reference, trial)
            differs = final_differences(reference, trial)
            where = ", ".join(f"resumed after step {r}" for r in trial.resumed_at) or "not interrupted"
            unseeded = [d for d in differs if d in ("RNG: python", "RNG: numpy")]
            if step is None and differs == unseeded:
                lines.append(f"{trial.name}: bit-identical over {len(reference.steps)} steps ({where})")
                if unseeded:
                    lines.append(f"  note: {' and '.join(d[5:] for d in unseeded)} generator states differ at the end: "
                                 "the script never seeds them and no step depended on them; seed them if it uses "
                                 "them")  # fmt: skip
                continue
            failed = True
            lines.append(f"{trial.name}: DIFFERS ({where})")
            if step is not None:
                lines.append(f"  first step that differs: {step} (metric {reference.steps[step][0]} uninterrupted, "
                             f"{trial.steps.get(step)} here)")  # fmt: skip
            lines.append(f"  final checkpoint: {', '.join(differs) if differs else 'identical'}")
            lines.append(f"  likely cause: {likely_cause(step or 0, trial.resumed_at, differs)}")
        lines.append("bit-identical" if not failed else "NOT bit-identical")
        return lines, 1 if failed else 0


def main(argv: list[str]) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="telepathy check-resume", description=__doc__.splitlines()[0])
    parser.add_argument("--sigterm_at", type=int, default=10, help="send SIGTERM once this step is logged [10]")
    parser.add_argument("--sigkill_at", type=int, default=20, help="send SIGKILL once this step is logged [20]")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take [600]")
    at = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:at])  # --help answers here
    if at == len(argv):
        parser.error("give the training command after '--', with {save_dir} where its save dir goes")
    if min(args.sigterm_at, args.sigkill_at) < 1 or not 0 < args.timeout < float("inf"):
        parser.error("--sigterm_at and --sigkill_at must be steps >= 1, --timeout a number of seconds > 0")
    lines, code = check(argv[at + 1 :], args.sigterm_at, args.sigkill_at, args.timeout)
    print("\n".join(lines), file=sys.stdout if code != 2 else sys.stderr)
    return code
