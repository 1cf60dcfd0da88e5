"""The layers of the package, checked from its source: imports run downward only, the torch-free half stays
torch-free, and save-dir and checkpoint file names are spelled in one module each."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "telepathy"

# Lower number = lower layer. A module may import its own layer or lower ones, never a higher one.
LAYERS = {
    "telepathy.errors": 0, "telepathy.tree": 0, "telepathy.step_log": 0, "telepathy.training_signals": 0,
    "telepathy.disk": 1, "telepathy.options": 1, "telepathy.save_policy": 1,
    "telepathy.unchanged": 2, "telepathy.module_state": 2,
    "telepathy.rng": 2, "telepathy.train_state": 2, "telepathy.data": 2, "telepathy.store": 2,
    "telepathy.distributed": 2,
    "telepathy.checkpointer": 3, "telepathy.restore": 3, "telepathy.loop": 3, "telepathy.hf_trainer": 3,
    "telepathy.lightning": 3,
    "telepathy.supervisor": 4, "telepathy.rescue": 4, "telepathy.child": 4, "telepathy.slurm": 4, "telepathy.tools": 4,
    "telepathy.process_tree": 4,
    "telepathy.__main__": 4,
    "telepathy.test_preemption": 4,
    "telepathy.latentwire": 5, "telepathy.preemptible_training": 5,  # the main job runs the LatentWire workload
    "telepathy": 0,  # the package's lazy __init__ (it imports nothing at run time)
}  # fmt: skip


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found.append((name, path))
    return found


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []  # type-checking imports do not run
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in names if n == "telepathy" or n.startswith("telepathy.")]


def test_imports_run_downward_only():
    upward = []
    for name, path in modules():
        if name == "telepathy":
            continue
        for imported in imports_of(path):
            try:
                target = layer_of(imported)
            except AssertionError:
                target = layer_of(imported.rsplit(".", 1)[0])  # `from telepathy.x import function`
            if target > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {imported} (layer {target})")
    assert upward == []


def test_every_module_has_a_layer_and_stays_small():
    for name, path in modules():
        layer_of(name)
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path} has {lines} lines: split it"


def test_the_torch_free_half_imports_no_torch():
    disk = [name for name, _ in modules() if name.startswith("telepathy.disk")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in disk)
            + "import telepathy.options, telepathy.save_policy, telepathy.errors, telepathy.supervisor\n"
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_status_imports_no_torch(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "telepathy", "status", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert imported and not [m for m in imported if m == "torch" or m.startswith("torch.")]


SAVE_DIR_NAMES = {"latest", "checkpoints", "emergency", "blobs", "events.jsonl", ".telepathy.lock",
                  ".telepathy.lock.json", ".tmp-", ".trash-", ".invalid-"}  # fmt: skip
CHECKPOINT_FILE_NAMES = {"manifest.json", "optimizer.pt", "state.pt", "sharded.metadata", "rank_"}


@pytest.mark.parametrize(("names", "home"), [(SAVE_DIR_NAMES, "save_dir.py"), (CHECKPOINT_FILE_NAMES, "contents.py")])
def test_names_of_files_are_spelled_in_one_module(names, home):
    """A path literal outside its module is how layout knowledge spreads; argparse groups and manifest keys
    ("blobs" as a field of the manifest) are words, not paths, and are allowed where they are used as such;
    durable.py names the temporaries of its single-file replacements (``.NAME.tmp-PID``) for any path."""
    spread = []
    for name, path in modules():
        if path.name in (home, "durable.py") or name.startswith("telepathy.latentwire"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                spread.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    allowed = {"blobs", "checkpoints", "emergency"}  # manifest keys, the "checkpoints" argparse group, reasons
    assert [s for s in spread if s.rsplit("'", 2)[-2] not in allowed] == []
