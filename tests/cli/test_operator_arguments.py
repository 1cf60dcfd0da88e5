"""Bad input to the operator verbs and to the two trainers, in this process and fast: paths that name nothing
usable, event records with fields of the wrong type, and flag values the parsers used to let through. Each is
one line and exit 2 (the slow adversarial suite tries many more of them)."""

from __future__ import annotations

import json
import time

import pytest
from harness import telepathy_in_process

from telepathy.latentwire import config
from telepathy.tools.run_events import run_events


def cli(*args: str) -> tuple[int, str, str]:
    done = telepathy_in_process(*args)
    return done.returncode, done.stdout, done.stderr


def one_line(err: str) -> str:
    """The complaint of a refusal (argparse's usage block left out)."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def save_dir(tmp_path):
    """A save dir as the readers see it: checkpoints/ (none committed) and an event log."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    return tmp_path / "run"


def write_events(save_dir, *records):
    now = time.time() - 10
    lines = [json.dumps({"time": now, "source": "trainer", "pid": 7, **record}) for record in records]
    (save_dir / "events.jsonl").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ the event log
def test_records_with_fields_of_the_wrong_type_are_left_out_and_counted(save_dir):
    write_events(save_dir, {"event": "start", "step": 0, "epoch": 0},
                 {"event": "progress", "step": 5, "epoch": 0, "metric": 1.5, "steps_per_s": 2.0},
                 {"event": "progress", "step": "six", "metric": 1.0, "steps_per_s": 2.0},  # step a string
                 {"event": "save", "step": True, "reason": "final"},  # True is not a step
                 {"event": "exit", "exit_code": None},
                 {"event": "preempt", "step": 5},  # without its exit code
                 {"event": "resume", "step": 10**30},  # past any step counter
                 {"event": "note", "time": -5.0},  # before 1970
                 {"event": "signal", "signal": "SIGUSR1"})  # fmt: skip
    events, skipped = run_events(save_dir)
    assert [e["event"] for e in events] == ["start", "progress", "signal"] and skipped == 6


def test_status_says_how_many_records_it_left_out(save_dir):
    write_events(save_dir, {"event": "start", "step": 0, "epoch": 0}, {"event": "exit", "exit_code": "abc"})
    code, out, _ = cli("status", str(save_dir))
    assert code == 0 and "1 record of events.jsonl skipped" in out
    code, out, _ = cli("status", str(save_dir), "--json")
    status = json.loads(out)
    assert code == 0 and status["skipped_events"] == 1 and status["last_exit_code"] is None
    write_events(save_dir, {"event": "start", "step": 0, "epoch": 0})
    assert "skipped" not in cli("status", str(save_dir))[1]  # nothing to say when nothing was left out


def test_plot_writes_the_file_it_was_given_and_notes_what_it_left_out(save_dir, tmp_path):
    pytest.importorskip("matplotlib")
    write_events(save_dir, *({"event": "progress", "step": s, "epoch": 0, "metric": 1 / s, "steps_per_s": 2.0}
                             for s in range(1, 5)), {"event": "progress", "step": 5, "metric": "low"})  # fmt: skip
    code, out, err = cli("plot", str(save_dir), "--out", str(tmp_path / "loss"))
    assert code == 0, err
    assert (tmp_path / "loss").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "loss.png").exists()
    assert f"wrote {tmp_path / 'loss'}" in out and "1 record of events.jsonl skipped" in out


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("verb", ["status", "list", "verify", "prune", "plot", "export"])
def test_an_empty_or_too_long_path_is_one_line_and_exit_2(save_dir, tmp_path, verb, monkeypatch):
    monkeypatch.chdir(save_dir)  # an empty path must not mean the save dir it is run from
    code, _, err = cli(verb, "")
    assert code == 2 and "must name a path" in one_line(err)
    too_long = tmp_path / ("x" * 300)
    code, _, err = cli(verb, str(too_long))
    assert code == 2 and one_line(err) == f"telepathy {verb}: {too_long} cannot be used: File name too long"


def test_export_refuses_a_checkpoint_that_is_not_one_and_an_out_that_is_a_file(save_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for checkpoint in (save_dir, tmp_path / "nope", tmp_path / "notes.txt"):
        code, _, err = cli("export", str(save_dir), "--checkpoint", str(checkpoint))
        assert code == 2 and f"--checkpoint {checkpoint} is not a checkpoint directory" in one_line(err)
    step = save_dir / "checkpoints" / "step_00000001"
    step.mkdir()
    (step / "manifest.json").write_text("{}")
    code, _, err = cli("export", str(save_dir), "--checkpoint", str(step), "--out", str(tmp_path / "notes.txt"))
    assert code == 2 and "exists and is not a directory" in one_line(err)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_plot_refuses_a_directory_as_its_out(save_dir, tmp_path):
    code, _, err = cli("plot", str(save_dir), "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path} is a directory" in one_line(err)
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.png"))


# ---------------------------------------------------------------------------------- the main job's flags
@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [("--max_bytes", "0", ">= 1"), ("--num_workers", "-1", ">= 0"), ("--step_delay", "inf", "finite"),
     ("--step_delay", "-1", ">= 0"), ("--dataset", "", "must name a path"), ("--dataset", "<missing>", "not exist"),
     ("--dataset", "<dir>", "not a regular file"), ("--resume_from", "<missing>", "not exist"),
     ("--llama_id", "<missing>", "not exist"), ("--qwen_id", "./nope", "not exist"), ("--samples", "0", ">= 1")],
)  # fmt: skip
def test_the_main_job_refuses_values_before_anything_starts(tmp_path, capsys, flag, value, said):
    value = {"<missing>": str(tmp_path / "nope"), "<dir>": str(tmp_path)}.get(value, value)
    with pytest.raises(SystemExit) as refused:
        config.parse([flag, value, "--save_dir", str(tmp_path / "run")])
    line = one_line(capsys.readouterr().err)
    assert refused.value.code == 2 and f"argument {flag}" in line and said in line


def test_a_hub_id_is_left_to_the_download(tmp_path):
    args = config.parse(["--llama_id", "org/model", "--qwen_id", "model", "--save_dir", str(tmp_path / "run")])
    assert (args.llama_id, args.qwen_id) == ("org/model", "model")


# ------------------------------------------------------------------------------ the test tool's flags
@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lr", "0"), ("--lr", "nan"), ("--epochs", "0"), ("--seed", "-1"), ("--num_workers", "-1"),
     ("--threads", "0"), ("--step_delay", "-1"), ("--save_dir", ""), ("--save_dir", "<a file>"),
     ("--resume_from", "<missing>")],
)  # fmt: skip
def test_the_test_tool_refuses_values_before_anything_starts(tmp_path, capsys, flag, value):
    from telepathy import test_preemption

    (tmp_path / "notes.txt").write_text("mine")
    value = {"<missing>": str(tmp_path / "nope"), "<a file>": str(tmp_path / "notes.txt")}.get(value, value)
    argv = [flag, value] if flag == "--save_dir" else [flag, value, "--save_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as refused:
        test_preemption.parse_args(argv)
    line = one_line(capsys.readouterr().err)
    assert refused.value.code == 2 and flag in line and not (tmp_path / "run").exists()


def test_the_test_tool_refuses_a_save_dir_it_cannot_create(caplog):
    from telepathy import test_preemption

    with pytest.raises(SystemExit) as refused:  # as root, /proc passes the permission check: creating it fails
        test_preemption.main(["--save_dir", "/proc/telepathy-run", "--duration", "1"])
    assert refused.value.code == 2
    if caplog.records:  # refused by train() (as root), not by the parser
        assert [r.getMessage() for r in caplog.records] == [
            "cannot create --save_dir /proc/telepathy-run: No such file or directory"
        ]
