"""Rule 6, operator tools and flags: every verb of ``python -m telepathy``, every flag of the main job
(``python -m telepathy.preemptible_training``) and of the local test tool (``python -m telepathy.test_preemption``)
answers bad input (0, negative, nan, inf, empty, non-numeric values; missing paths; files where directories are
expected; /proc targets) with one line and exit 2, never a traceback. ``status`` and ``list`` tolerate a torn,
binary or foreign line in ``events.jsonl``, a huge or empty event log, and a ``latest`` that points at itself or
outside."""

from __future__ import annotations

import json
import os
import time

import pytest
from adversary import (
    assert_no_traceback,
    assert_one_line_error,
    assert_still_verified,
    cli,
    parse_in_process,
    program,
    python_code,
)

from telepathy import test_preemption as tool
from telepathy.disk.save_dir import SaveDir
from telepathy.latentwire import config

VERBS = ["status", "list", "verify", "prune", "plot", "export"]


def event(kind, **fields):
    return {"time": round(time.time() - 60, 3), "event": kind, "source": "trainer", "pid": 4242, **fields}


def write_events(save_dir, records, tail=b""):
    with open(save_dir / "events.jsonl", "wb") as f:
        for record in records:
            f.write((json.dumps(record) + "\n").encode())
        f.write(tail)


GOOD_EVENTS = [event("start", step=0, epoch=0)] + [
    event("progress", step=s, epoch=0, metric=1.0 / s, steps_per_s=2.0) for s in range(1, 6)
] + [event("save", step=5, epoch=0, reason="interval", path="x", bytes=1, seconds=0.1),
     event("preempt", step=5, exit_code=99, signal="SIGTERM"), event("resume", step=5, epoch=0, path="x")]  # fmt: skip


@pytest.fixture
def run_with_events(save_dir, run3):
    write_events(save_dir, GOOD_EVENTS)
    return save_dir


# ----------------------------------------------------------------------------------- verbs: bad values
BAD_COUNTS = ["0", "-1", "nan", "inf", "", "abc", "1.5", "1e3"]


@pytest.mark.parametrize("value", BAD_COUNTS)
@pytest.mark.parametrize("flag", ["--keep_last", "--keep_every"])
def test_prune_refuses_a_bad_count_in_one_line(run_with_events, flag, value):
    done = cli("prune", str(run_with_events), flag, value)
    assert_one_line_error(done, 2)
    assert len([p for p in (run_with_events / "checkpoints").iterdir()]) == 3


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["status"], ["status", "--bogus", "x"], ["list", "x", "--bogus"], ["verify"],
     ["prune", "x", "--keep-last"], ["plot", "x", "--out"], ["export", "x", "--checkpoint"]],
    ids=repr,
)  # fmt: skip
def test_a_malformed_command_line_is_one_line_and_exit_2(argv):
    assert_one_line_error(cli(*argv), 2)


# ------------------------------------------------------------------------------------------- verbs: paths
def bad_path(kind, tmp_path):
    if kind == "missing":
        return str(tmp_path / "nope")
    if kind == "a file":
        (tmp_path / "notes.txt").write_text("mine")
        return str(tmp_path / "notes.txt")
    if kind == "under a file":
        (tmp_path / "notes.txt").write_text("mine")
        return str(tmp_path / "notes.txt" / "run")
    if kind == "too long":
        return str(tmp_path / ("x" * 300))
    return {"/proc": "/proc", "/proc/self/fd": "/proc/self/fd", "/dev/null": "/dev/null", "empty": ""}[kind]


PATH_KINDS = ["missing", "a file", "under a file", "too long", "/proc", "/proc/self/fd", "/dev/null", "empty"]


@pytest.mark.parametrize("kind", PATH_KINDS)
@pytest.mark.parametrize("verb", VERBS)
def test_a_verb_given_a_path_that_is_not_a_save_dir_is_one_line_and_exit_2(tmp_path, run_with_events, verb, kind):
    """``empty`` runs from inside a real save dir: an empty argument must not silently mean the current directory."""
    path = bad_path(kind, tmp_path)
    done = cli(verb, path, cwd=run_with_events if kind == "empty" else None)
    assert_one_line_error(done, 2)
    assert_still_verified([p for p in (run_with_events / "checkpoints").iterdir()])


def out_path(kind, tmp_path, run):
    if kind == "a file":
        (tmp_path / "notes.txt").write_text("mine")
        return str(tmp_path / "notes.txt")
    if kind == "under a file":
        (tmp_path / "notes.txt").write_text("mine")
        return str(tmp_path / "notes.txt" / "out")
    if kind == "a directory":
        return str(tmp_path)
    return {"empty": "", "/proc": "/proc/telepathy-export", "/dev/null": "/dev/null"}[kind]


@pytest.mark.parametrize("kind", ["empty", "a file", "under a file", "/proc", "/dev/null"])
def test_export_to_a_bad_out_is_one_line_and_exit_2(tmp_path, run_with_events, kind):
    out = out_path(kind, tmp_path, run_with_events)
    done = cli("export", str(run_with_events), "--out", out, cwd=tmp_path)
    assert_one_line_error(done, 2)
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "notes.txt").is_dir()


@pytest.mark.parametrize("inside", ["latest", "checkpoints/step_99999999", "checkpoints", "blobs/x", "emergency/x"])
def test_export_into_the_save_dirs_own_checkpoint_tree_is_refused(tmp_path, run_with_events, inside):
    """From review 5: --out SAVE_DIR/latest wrote into a committed checkpoint; --out SAVE_DIR/checkpoints/step_N
    made a directory every later resume skipped as damaged."""
    before = sorted(p.relative_to(run_with_events) for p in run_with_events.rglob("*"))
    done = cli("export", str(run_with_events), "--out", str(run_with_events / inside), cwd=tmp_path)
    assert_one_line_error(done, 2)
    assert sorted(p.relative_to(run_with_events) for p in run_with_events.rglob("*")) == before
    assert_still_verified([ref.path for ref in SaveDir(run_with_events).committed()])


@pytest.mark.parametrize("kind", ["missing", "a file", "empty", "/proc", "the save dir itself"])
def test_export_of_a_bad_checkpoint_path_is_one_line_and_exit_2(tmp_path, run_with_events, kind):
    checkpoint = str(run_with_events) if kind == "the save dir itself" else bad_path(kind, tmp_path)
    done = cli("export", str(run_with_events), "--checkpoint", checkpoint, "--out", str(tmp_path / "out"),
               cwd=tmp_path)  # fmt: skip
    assert_one_line_error(done, 2)


@pytest.mark.parametrize("kind", ["empty", "a directory", "under a file", "/proc"])
def test_plot_to_a_bad_out_is_one_line_and_exit_2(tmp_path, run_with_events, kind):
    out = out_path(kind, tmp_path, run_with_events)
    done = cli("plot", str(run_with_events), "--out", out, cwd=tmp_path)
    assert_one_line_error(done, 2)


# ------------------------------------------------------------------------------------------ events.jsonl
T = round(time.time() - 30, 3)
FOREIGN_LINES = {
    "torn": b'{"time": 1, "event": "sa',
    "binary": b"\x00\xff\xfe\x80 garbage \x00",
    "a JSON list": b"[1, 2, 3]",
    "a number": b"42",
    "null": b"null",
    "event an int": json.dumps({"time": T, "event": 5}).encode(),
    "time a string": json.dumps({"time": "now", "event": "save"}).encode(),
    "exit without a code": json.dumps({"time": T, "event": "exit"}).encode(),
    "exit code a string": json.dumps({"time": T, "event": "exit", "exit_code": "abc"}).encode(),
    "exit code null": json.dumps({"time": T, "event": "exit", "exit_code": None}).encode(),
    "exit code Infinity": b'{"time": %d, "event": "exit", "exit_code": Infinity}' % int(T),
    "preempt without a code": json.dumps({"time": T, "event": "preempt", "step": 3}).encode(),
    "progress rate a string": json.dumps(
        {"time": T, "event": "progress", "step": 6, "steps_per_s": "fast", "metric": 1.0, "pid": 1}
    ).encode(),  # fmt: skip
    "progress rate 0": json.dumps(
        {"time": T, "event": "progress", "step": 6, "steps_per_s": 0, "metric": 1.0, "pid": 1}
    ).encode(),  # fmt: skip
    "progress rate negative": json.dumps(
        {"time": T, "event": "progress", "step": 6, "steps_per_s": -3.0, "metric": 1.0, "pid": 1}
    ).encode(),  # fmt: skip
    "progress metric a string": json.dumps(
        {"time": T, "event": "progress", "step": 6, "steps_per_s": 1.0, "metric": "low", "pid": 1}
    ).encode(),  # fmt: skip
    "progress step a string": json.dumps(
        {"time": T, "event": "progress", "step": "six", "steps_per_s": 1.0, "metric": 1.0, "pid": 1}
    ).encode(),  # fmt: skip
    "progress without step or pid": json.dumps(
        {"time": T, "event": "progress", "metric": 1.0, "steps_per_s": 1.0}
    ).encode(),  # fmt: skip
    "resume step a string": json.dumps({"time": T, "event": "resume", "step": "x"}).encode(),
    "resume without a step": json.dumps({"time": T, "event": "resume"}).encode(),
    "save step a string": json.dumps({"time": T, "event": "save", "step": "abc", "reason": "final"}).encode(),
    "time 1e300": json.dumps({"time": 1e300, "event": "save", "step": 6}).encode(),
    "time negative": json.dumps({"time": -1e12, "event": "exit", "exit_code": 0}).encode(),
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "a 20 MiB line": json.dumps({"time": T, "event": "note", "text": "x" * (20 << 20)}).encode(),
}


@pytest.mark.parametrize("how", sorted(FOREIGN_LINES))
@pytest.mark.parametrize("reader", [["status"], ["status", "--json"], ["plot"]], ids=" ".join)
def test_status_and_plot_tolerate_a_foreign_last_line_in_the_event_log(save_dir, run3, reader, how):
    write_events(save_dir, GOOD_EVENTS, tail=FOREIGN_LINES[how] + b"\n")
    started = time.monotonic()
    done = cli(reader[0], str(save_dir), *reader[1:])
    assert time.monotonic() - started < 10
    assert "Traceback" not in done.text, done.text[-3000:]
    if reader[0] == "status":
        assert done.code == 0, done.text[-2000:]
    else:
        assert done.code in (0, 1) and (done.code == 0 or len(done.err.strip().splitlines()) == 1), done.text[-2000:]
    assert_still_verified(run3)


@pytest.mark.parametrize("kind", ["empty", "whitespace", "a directory", "a symlink to /etc/passwd", "only garbage"])
@pytest.mark.parametrize("verb", ["status", "list", "plot"])
def test_status_and_list_tolerate_an_odd_event_log(save_dir, run3, verb, kind):
    events = save_dir / "events.jsonl"
    events.unlink()
    if kind == "empty":
        events.write_bytes(b"")
    elif kind == "whitespace":
        events.write_bytes(b"\n \n\t\n")
    elif kind == "a directory":
        events.mkdir()
    elif kind == "a symlink to /etc/passwd":
        os.symlink("/etc/passwd", events)
    else:
        events.write_bytes(os.urandom(1 << 16))
    done = cli(verb, str(save_dir))
    assert "Traceback" not in done.text, done.text[-3000:]
    assert done.code == 0 or (verb == "plot" and done.code == 1 and len(done.err.strip().splitlines()) == 1)


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["status", "plot"])
def test_a_huge_event_log_is_not_read_into_memory(save_dir, run3, verb):
    with open(save_dir / "events.jsonl", "ab") as f:
        f.truncate(4 << 30)  # sparse: costs no disk
    code = "import sys; from telepathy.__main__ import main; sys.exit(main(sys.argv[1:]))"
    done = python_code(code, verb, str(save_dir), timeout=120, limit_memory=2 << 30)
    assert_no_traceback(done)
    assert done.code == 0 or (verb == "plot" and done.code == 1)


# ---------------------------------------------------------------------------------------------- latest
def point_latest(save_dir, tmp_path, kind):
    latest = save_dir / "latest"
    os.unlink(latest)
    target = {"itself": "latest", "outside": str(tmp_path), "/": "/", "a file": "checkpoints/step_00000003/model.pt",
              "checkpoints/": "checkpoints", "missing": "checkpoints/step_00000099", "far up": "../../../../..",
              "/proc/self/root": "/proc/self/root"}.get(kind)  # fmt: skip
    if kind == "a loop of two":
        os.symlink("latest2", latest)
        os.symlink("latest", save_dir / "latest2")
        return
    os.symlink(target, latest)


LATEST_KINDS = ["itself", "a loop of two", "outside", "/", "a file", "checkpoints/", "missing", "far up",
                "/proc/self/root"]  # fmt: skip


@pytest.mark.parametrize("kind", LATEST_KINDS)
@pytest.mark.parametrize("verb", ["status", "list", "verify", "prune", "export"])
def test_tools_tolerate_a_latest_pointing_anywhere(tmp_path, save_dir, run3, verb, kind):
    point_latest(save_dir, tmp_path, kind)
    extra = {"prune": ["--keep_last", "5"], "export": ["--out", str(tmp_path / "out")]}.get(verb, [])
    started = time.monotonic()
    done = cli(verb, str(save_dir), *extra)
    assert time.monotonic() - started < 10
    assert "Traceback" not in done.text, done.text[-3000:]
    assert done.code == 0 or (verb == "verify" and done.code == 1), done.text[-2000:]
    assert_still_verified(run3)


# ---------------------------------------------------------------------------------- the main job's flags
POSITIVE_FLOAT = ["0", "-1", "nan", "inf", "", "abc"]
NON_NEGATIVE_INT = ["-1", "nan", "", "abc", "1.5"]
POSITIVE_INT = ["0", "-1", "nan", "", "abc", "1.5"]
MAIN_FLAGS = (
    [(f, v) for f in ("--checkpoint_interval", "--grace_period", "--restart_backoff", "--lr") for v in POSITIVE_FLOAT]
    + [(f, v) for f in ("--max_restarts", "--seed") for v in NON_NEGATIVE_INT]
    + [(f, v) for f in ("--save_every_steps", "--keep_last", "--keep_every", "--agree_every", "--samples",
                        "--epochs", "--batch_size", "--threads", "--log_every", "--latent_len", "--d_z")
       for v in POSITIVE_INT]
    + [("--num_workers", v) for v in ("nan", "", "abc")]
    + [("--step_delay", v) for v in ("", "abc")]
    + [("--format", v) for v in ("bogus", "")]
    + [("--save_dir", v) for v in ("", "<a file>", "<under a file>", "/dev/null", "/proc/self")]
    + [("--max_bytes", v) for v in ("nan", "", "abc")]
)  # fmt: skip
MAIN_FLAGS_PAST_THE_PARSER = (
    [("--max_bytes", "0"), ("--num_workers", "-1"), ("--step_delay", "-1"), ("--step_delay", "inf")]
    + [("--save_dir", "/proc/telepathy-run"), ("--resume_from", "<missing>")]
    + [("--dataset", v) for v in ("<missing>", "")] + [("--llama_id", "<missing>")]
)  # fmt: skip


def concrete(value, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return {"<a file>": str(tmp_path / "notes.txt"), "<under a file>": str(tmp_path / "notes.txt" / "run"),
            "<missing>": str(tmp_path / "nope"), "<a directory>": str(tmp_path), "<too long>": "x" * 300,
            }.get(value, value)  # fmt: skip


def main_job_argv(tmp_path, flag, value):
    defaults = {"--save_dir": str(tmp_path / "run"), "--samples": "16", "--epochs": "1", "--max_restarts": "0"}
    defaults.pop(flag, None)
    return [flag, concrete(value, tmp_path), *(x for item in defaults.items() for x in item)]


def check_main_job(tmp_path, flag, value):
    argv = main_job_argv(tmp_path, flag, value)
    parsed = parse_in_process(config.parse, argv)
    if parsed.code != 0:  # refused by the parser, before anything starts
        assert_one_line_error(parsed, 2)
        assert flag in parsed.err or "--save_dir" in parsed.err
        return
    done = program("telepathy.preemptible_training", *argv, timeout=60, cwd=tmp_path)
    assert_no_traceback(done)
    assert done.code == 2, f"{flag} {value!r}: exit {done.code}: {done.text[-1500:]}"


@pytest.mark.parametrize(("flag", "value"), MAIN_FLAGS, ids=lambda x: repr(x))
def test_the_main_job_refuses_a_bad_flag_value_in_one_line(tmp_path, flag, value):
    check_main_job(tmp_path, flag, value)


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "value"), MAIN_FLAGS_PAST_THE_PARSER, ids=lambda x: repr(x))
def test_the_main_job_refuses_a_bad_value_its_parser_lets_through(tmp_path, flag, value):
    check_main_job(tmp_path, flag, value)


@pytest.mark.parametrize("command", [[], ["/nonexistent/trainer"], ["no-such-command-here"]], ids=repr)
def test_the_main_job_refuses_a_bad_command_after_double_dash(tmp_path, command):
    from telepathy.preemptible_training import main

    done = parse_in_process(main, ["--save_dir", str(tmp_path / "run"), "--", *command])
    assert_one_line_error(done, 2)


# ------------------------------------------------------------------------------ the test tool's flags
TOOL_FLAGS = (
    [(f, v) for f in ("--duration", "--interval", "--checkpoint_interval") for v in POSITIVE_FLOAT]
    + [(f, v) for f in ("--epochs", "--samples", "--batch_size", "--log_every", "--save_every_steps", "--keep_last",
                        "--keep_every", "--agree_every", "--threads") for v in ("nan", "", "abc", "1.5")]
    + [(f, v) for f in ("--samples", "--batch_size", "--log_every", "--save_every_steps", "--keep_last",
                        "--keep_every", "--agree_every") for v in ("0", "-1")]
    + [("--epochs", "-1")]
    + [(f, v) for f in ("--seed", "--num_workers") for v in ("nan", "", "abc")]
    + [("--lr", v) for v in ("", "abc")] + [("--step_delay", v) for v in ("", "abc")]
    + [("--format", v) for v in ("bogus", "")]
)  # fmt: skip
TOOL_FLAGS_PAST_THE_PARSER = (
    [("--lr", v) for v in ("0", "nan")] + [("--epochs", "0"), ("--seed", "-1"), ("--num_workers", "-1")]
    + [("--threads", "0"), ("--step_delay", "-1")]
    + [("--save_dir", v) for v in ("", "<a file>", "/proc/telepathy-run")]
    + [("--resume_from", "<missing>")]
)  # fmt: skip


def check_tool(tmp_path, flag, value):
    argv = [flag, concrete(value, tmp_path)]
    if flag != "--save_dir":
        argv += ["--save_dir", str(tmp_path / "run")]
    argv += ["--duration", "3"] if flag != "--duration" else []
    parsed = parse_in_process(tool.parse_args, argv)
    if parsed.code != 0:
        assert_one_line_error(parsed, 2)
        return
    done = program("telepathy.test_preemption", *argv, "--epochs" if flag != "--epochs" else "--seed",
                   "1" if flag != "--epochs" else "0", timeout=40, cwd=tmp_path)  # fmt: skip
    assert_no_traceback(done)
    assert done.code == 2, f"{flag} {value!r}: exit {done.code}: {done.text[-1500:]}"
    assert not list(tmp_path.glob("checkpoints")), "an empty --save_dir wrote into the current directory"


@pytest.mark.parametrize(("flag", "value"), TOOL_FLAGS, ids=lambda x: repr(x))
def test_the_test_tool_refuses_a_bad_flag_value_in_one_line(tmp_path, flag, value):
    check_tool(tmp_path, flag, value)


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "value"), TOOL_FLAGS_PAST_THE_PARSER, ids=lambda x: repr(x))
def test_the_test_tool_refuses_a_bad_value_its_parser_lets_through(tmp_path, flag, value):
    check_tool(tmp_path, flag, value)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["status", "/nonexistent"], ["prune", "/proc", "--keep_last", "0"], []], ids=repr)
def test_the_telepathy_program_answers_bad_input_in_one_line(argv):
    assert_one_line_error(program("telepathy", *argv, timeout=60), 2)


NOT_UTF8 = os.fsdecode(b"run\xff")  # a name with a byte that is not UTF-8 (decoded with surrogateescape)


@pytest.mark.parametrize("verb", VERBS)
def test_a_save_dir_whose_name_is_not_utf8_is_refused_by_every_verb(tmp_path, verb):
    """From review 5: torch cannot open a path that is not UTF-8, so such a save dir saved fine and could never be
    loaded: the resume skipped every checkpoint as damaged and advised moving them away; export and plot crashed."""
    assert_one_line_error(cli(verb, str(tmp_path / NOT_UTF8)), 2)


def test_the_main_job_and_the_library_refuse_a_save_dir_whose_name_is_not_utf8(tmp_path):
    from telepathy import Checkpointer
    from telepathy.errors import UsageError

    parsed = parse_in_process(config.parse, ["--save_dir", str(tmp_path / NOT_UTF8)])
    assert_one_line_error(parsed, 2)
    assert "not a valid UTF-8 path" in parsed.err
    with pytest.raises(UsageError, match="not a valid UTF-8 path"):
        Checkpointer(tmp_path / NOT_UTF8, parts={})
    assert not (tmp_path / NOT_UTF8).exists(), "a save dir was created before the refusal"


def test_the_restart_backoff_doubles_up_to_an_hour_however_many_failures():
    """From review 5: --max_restarts 10**30 was accepted and the doubled delay had no cap (restart 20 of the
    default 2 s backoff slept about 12 days, holding the allocation)."""
    from telepathy.supervisor import restart_delay

    assert [restart_delay(2.0, n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert restart_delay(2.0, 20) == restart_delay(2.0, 10**30) == 3600.0
    assert restart_delay(0.0, 10**30) == 0.0


def test_a_utf8_link_to_a_save_dir_whose_name_is_not_utf8_is_accepted(tmp_path):
    """(Review 6: the check looked at the resolved path, but torch opens the files through the link's name.)"""
    import torch

    from telepathy import Checkpointer, TrainState

    (tmp_path / NOT_UTF8).mkdir()
    (tmp_path / "link").symlink_to(tmp_path / NOT_UTF8)
    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path / "link", parts={"model": model}) as ckpt:
        ckpt.save(TrainState(global_step=3), "test")
    with Checkpointer(tmp_path / "link", parts={"model": torch.nn.Linear(2, 2)}) as ckpt:
        assert ckpt.resume().global_step == 3
