"""The README's Python examples run as written, and CI runs the README's test command."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs(index, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_loop_example_commits_a_final_checkpoint_and_resumes(tmp_path):
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[0]], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs/readme_example/latest/manifest.json").is_file()
    # 2 epochs x 8 batches; the rerun resumes a finished run instead of training `epochs` more (the seed's bug)
    steps = [p.name for p in (tmp_path / "runs/readme_example/checkpoints").iterdir()]
    assert steps == ["step_00000016"]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(pip install .*?)\n```", README)
    assert len(commands) == 2, "the README's first two commands: run the demo, run the tests"
    assert commands[1] in (REPO / ".ci/run").read_text()


BASH_BLOCKS = re.findall(r"(?:<!-- readme-test: (\w+) -->\n)?```bash\n(.*?)```", README, re.S)
OURS = re.compile(r"^(?:python (-m (?:telepathy[\w.]*)|tests/\S+\.py|benchmarks/\S+\.py)|telepathy)\b")


def commands(block: str) -> list[str]:
    """The block's command lines: continuations joined, comments and ``#SBATCH`` lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def our_invocations(line: str) -> list[list[str]]:
    """Each invocation of a telepathy program in a shell line, as argv (without the leading ``python``)."""
    found = []
    for part in re.split(r"&&|\||;", line):
        words = shlex.split(part.strip()) if part.strip() else []
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]  # VAR=value prefixes
        text = " ".join(words)
        if OURS.match(text):
            found.append(words[1:] if words[0] == "python" else words)
    return found


def program_of(argv: list[str]) -> list[str]:
    """What to call with --help: the program with its verb and positionals (up to the first flag)."""
    if argv[0] == "telepathy":
        argv = ["-m", "telepathy", *argv[1:]]
    start = 2 if argv[0] == "-m" else 1
    flags = [i for i, word in enumerate(argv[start:], start) if word.startswith("-")]
    return argv[: flags[0]] if flags else argv


@functools.cache
def help_of(program: tuple[str, ...]) -> str:
    done = subprocess.run([sys.executable, *program, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(program)} --help failed:\n{done.stderr}"
    return done.stdout


def test_every_shell_example_parses_and_uses_only_real_flags_and_files():
    """Every bash block is valid shell; every telepathy program it names exists and accepts each flag it is
    given (checked against that program's --help); every repository file it names exists."""
    checked = 0
    for _, block in BASH_BLOCKS:
        placeholders = re.sub(r"<[a-z][a-z ]*>", "PLACEHOLDER", block)  # <pid>: the reader fills it in
        syntax = subprocess.run(["bash", "-n"], input=placeholders, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{block}\n{syntax.stderr}"
        for line in commands(block):
            for path in re.findall(r"(?:telepathy|tests|benchmarks|scripts)/[\w/.-]+\.(?:py|slurm|sh)", line):
                assert (REPO / path).is_file(), f"README names {path}, which does not exist"
            for argv in our_invocations(line):
                program = program_of(argv)
                helptext = help_of(tuple(program))
                flags = [w.split("=")[0] for w in argv if w.startswith("--")]
                for flag in flags[: flags.index("--")] if "--" in flags else flags:
                    assert flag in helptext, f"README passes {flag} to {' '.join(program)}, which lacks it"
                checked += 1
            for value in re.findall(r'TRAIN_ARGS="([^"]*)"', line):  # flags the submit script hands the trainer
                helptext = help_of(("-m", "telepathy.preemptible_training"))
                assert all(f in helptext for f in value.split() if f.startswith("--")), value
    assert checked >= 12, checked  # the parser found the commands (14 when written)


@pytest.mark.parametrize("index", [i for i, (mark, _) in enumerate(BASH_BLOCKS) if mark == "run"])
def test_shell_example_runs_as_written(index, tmp_path):
    block = BASH_BLOCKS[index][1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_the_local_signal_example_does_what_the_readme_says(tmp_path):
    """The spec's local test: start the tool, then `kill -USR1 <pid>` (saves, keeps training) and
    `kill -TERM <pid>` (saves, exits 99), with the printed PID in place of <pid>."""
    block = next(b for mark, b in BASH_BLOCKS if mark == "signals")
    start, *kills = commands(block)
    proc = subprocess.Popen(shlex.split(start), cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    pid = next(m.group(1) for line in proc.stdout if (m := re.match(r"PID (\d+)", line)))
    assert int(pid) == proc.pid
    save_dir = tmp_path / "runs" / "test_preemption"
    usr1 = next(k for k in kills if "-USR1" in k)
    subprocess.run(shlex.split(usr1.replace("<pid>", pid)), check=True)
    deadline = time.monotonic() + 30
    while not (save_dir / "latest").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "SIGUSR1 did not save"
        time.sleep(0.05)
    assert proc.poll() is None  # kept training
    term = next(k for k in kills if "-TERM" in k)
    subprocess.run(shlex.split(term.replace("<pid>", pid)), check=True)
    assert proc.wait(timeout=30) == 99
    reasons = [json.loads(line).get("reason") for line in (save_dir / "events.jsonl").read_text().splitlines()]
    assert "signal:SIGUSR1" in reasons and "signal:SIGTERM" in reasons
