"""Tools of the adversarial suite (``tests/adversarial``): runs to attack, checkpoints tampered with and re-sealed
(so that they still verify), hostile pickles, a snapshot of everything outside a save dir, an audit of every path
the library opens, renames or deletes, and the operator command run in-process or as a program.

Nothing here imports from the tests; the suite imports it as ``adversary`` (tests/conftest.py puts this folder on
``sys.path``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from telepathy.checkpointer import Checkpointer
from telepathy.disk.catalog import Catalog
from telepathy.disk.manifest import build_manifest, hash_file, self_hash  # noqa: F401 (re-exported for tests)
from telepathy.disk.save_dir import SaveDir
from telepathy.errors import CheckpointInvalid
from telepathy.train_state import TrainState

REPO = Path(__file__).resolve().parents[2]
SIGNATURE = {"batch_size": 8, "seed": 0, "world_size": 1}
BATCHES_PER_EPOCH = 10  # what the tests' runs pretend an epoch has (for within_epoch)
DELETE = object()  # a manifest change that removes the key


# ---------------------------------------------------------------------------------------------- runs to attack
def small_model(blob_sized: bool = False) -> nn.Module:
    """A deterministic model; ``blob_sized``: its weight is 64 KiB, so a differential save keeps it in blobs/."""
    torch.manual_seed(0)
    return nn.Linear(128, 128) if blob_sized else nn.Linear(4, 3)


def checkpointer(save_dir: Path, *, model: nn.Module | None = None, fmt: str = "full", **options: Any) -> Checkpointer:
    """A Checkpointer over a small model with an AdamW optimizer that has state (one step taken)."""
    model = model if model is not None else small_model(blob_sized=fmt != "full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, model.in_features)).sum().backward()
    optimizer.step()
    options.setdefault("interval", None)
    options.setdefault("keep_last", 10)
    return Checkpointer(save_dir, parts={"model": model}, optimizer=optimizer, signature=SIGNATURE, format=fmt,
                        **options)  # fmt: skip


def make_run(save_dir: Path, steps: Iterable[int] = (1, 2, 3), *, fmt: str = "full", metrics: bool = True,
             **options: Any) -> list[Path]:  # fmt: skip
    """Commit one checkpoint per step (position: epoch 0, batch = step) and release the save dir. The weights change
    a little between steps, so that each checkpoint of a differential run has a weight blob of its own."""
    paths = []
    with checkpointer(save_dir, fmt=fmt, **options) as ckpt:
        for step in steps:
            with torch.no_grad():
                ckpt.parts["model"].weight.add_(0.001)
            state = TrainState(epoch=0, global_step=step, batch_idx=step % BATCHES_PER_EPOCH)
            paths.append(ckpt.save(state, "interval", metric=1.0 / step if metrics else None))
    return paths


def step_dir(save_dir: Path, step: int) -> Path:
    return SaveDir(save_dir).step_dir(step)


def verified(save_dir: Path) -> list[Path]:
    """The committed and emergency checkpoints of ``save_dir`` that verify (files and blobs)."""
    catalog = Catalog(SaveDir(save_dir))
    good = []
    for directory in SaveDir(save_dir).all_checkpoints():
        try:
            catalog.verify(directory)
        except CheckpointInvalid:
            continue
        good.append(directory)
    return good


def assert_still_verified(paths: Iterable[Path]) -> None:
    """Every checkpoint that verified before still verifies (none lost, none damaged)."""
    for path in paths:
        assert path.is_dir(), f"committed checkpoint {path} was lost"
        Catalog(SaveDir.of_checkpoint(path)).verify(path)


# -------------------------------------------------------------------------------------- tampering and sealing
def read_manifest_doc(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_text())


def reseal(directory: Path, changes: Mapping[str, Any] | None = None, *, hash_from: Mapping[str, Path] | None = None,
           drop: Iterable[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Rewrite ``manifest.json`` so that the directory verifies again after tampering: every listed file (and each
    name in ``hash_from``, hashed from the given path) gets its current size and hash, ``changes`` are applied to
    the top level (``DELETE`` removes a key), the self-hash is recomputed. Returns the new manifest."""
    doc = read_manifest_doc(directory)
    files = {}
    for name in doc["files"]:
        if name in set(drop):
            continue
        path = directory / name
        if os.path.lexists(path) and stat.S_ISREG(os.lstat(path).st_mode):
            files[name] = {"bytes": path.stat().st_size, "xxh3_128": hash_file(path)}
        else:
            files[name] = doc["files"][name]
    for name, source in (hash_from or {}).items():
        files[name] = {"bytes": Path(source).stat().st_size, "xxh3_128": hash_file(source)}
    doc["files"] = files
    for key, value in (changes or {}).items():
        if value is DELETE:
            doc.pop(key, None)
        else:
            doc[key] = value
    doc.pop("manifest_xxh3_128", None)
    doc["manifest_xxh3_128"] = self_hash(doc)
    write_over(directory / "manifest.json", json.dumps(doc, indent=1, sort_keys=True).encode())
    return doc


def reseal_raw(directory: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as the manifest with a correct self-hash, whatever it says (absurd fields included).
    json.dumps writes float('inf') as Infinity, which json.loads reads back as inf."""
    doc = dict(doc)
    doc.pop("manifest_xxh3_128", None)
    doc["manifest_xxh3_128"] = self_hash(doc)
    write_over(directory / "manifest.json", json.dumps(doc, indent=1, sort_keys=True).encode())


def write_over(path: Path, data: bytes) -> None:
    """Replace a file (which may be read-only or a special file) with ``data``."""
    if os.path.lexists(path):
        os.unlink(path)
    path.write_bytes(data)


def load_raw(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")


def save_raw(path: Path, obj: Any) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    torch.save(obj, path)


def tamper_part(directory: Path, file: str, change: Callable[[Any], Any]) -> None:
    """Load ``file`` (plain data only), let ``change`` return the new content, save it and re-seal the manifest."""
    save_raw(directory / file, change(load_raw(directory / file)))
    reseal(directory)


# ------------------------------------------------------------------------------------------- hostile payloads
class Payload:
    """Unpickling it would create ``path`` (a marker that code ran)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def shared_bomb(shape: str, leaf: Any = 0, depth: int = 45) -> Any:
    """A structure that pickles to a few kilobytes (shared references) and describes 2**depth values or more."""
    if shape == "lists":
        value = [leaf]
        for _ in range(depth):
            value = [value, value]
    elif shape == "dicts":
        value = {"v": leaf}
        for _ in range(depth):
            value = {"a": value, "b": value}
    elif shape == "tuples":
        value = (leaf,)
        for _ in range(depth):
            value = (value, value)
    elif shape == "wide":  # 1000 ** 4 values from three shared lists
        value = [leaf] * 1000
        for _ in range(3):
            value = [value] * 1000
    else:
        raise ValueError(shape)
    return value


def deep_nesting_opcodes(depth: int) -> bytes:
    """Pickle opcodes for lists nested ``depth`` deep, built without recursion (EMPTY_LIST ... APPEND ...)."""
    return b"]" * depth + b"a" * (depth - 1)


def pickled_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def rewrite_pickle(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Rewrite the ``data.pkl`` record of a torch zip file (everything else kept)."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                new = edit(data)
                assert new != data, "the pickle edit changed nothing"
                data = new
            target.writestr(info.filename, data)
    write_over(path, out.getvalue())


def splice(path: Path, marker: str, opcodes: bytes) -> None:
    """Replace the pickled string ``marker`` inside a torch file with raw pickle ``opcodes``."""
    rewrite_pickle(path, lambda pkl: pkl.replace(pickled_str(marker), opcodes, 1))


LIE_BASE, LIE_VIEW = 1000, 777  # a view of 777 elements into a storage of 1000 (distinctive pickle bytes)


def storage_lie_tensor() -> torch.Tensor:
    return torch.zeros(LIE_BASE)[:LIE_VIEW]


def tell_storage_lie(path: Path, kind: str) -> None:
    """Edit a torch file holding ``storage_lie_tensor()`` so that the tensor claims more bytes than its storage:
    a larger size, a storage offset past the end, a larger stride, or a storage that claims fewer elements."""
    size = b"M" + LIE_VIEW.to_bytes(2, "little") + b"\x85"
    big = (10**8).to_bytes(4, "little")

    def edit(pkl: bytes) -> bytes:
        if kind == "size":
            return pkl.replace(size, b"J" + big + b"\x85", 1)
        if kind == "offset":
            return re.sub(rb"K\x00(" + re.escape(size) + rb")", lambda m: b"J" + big + m.group(1), pkl, count=1)
        if kind == "stride":
            return re.sub(rb"(" + re.escape(size) + rb"(?:q.)?)K\x01\x85", lambda m: m.group(1) + b"M\x10\x27\x85",
                          pkl, count=1, flags=re.S)  # fmt: skip
        if kind == "numel":
            return pkl.replace(b"M" + LIE_BASE.to_bytes(2, "little") + b"t", b"K\x0at", 1)
        raise ValueError(kind)

    rewrite_pickle(path, edit)


# ------------------------------------------------------------------------------------- what lies outside a run
def snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): kind, size, mtime and link target; ``exclude``d
    subtrees are left out (the save dir under attack)."""
    skip = {os.path.abspath(p) for p in exclude}
    found: dict[str, tuple] = {}

    def walk(directory: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if os.path.abspath(entry.path) in skip:
                continue
            st = entry.stat(follow_symlinks=False)
            target = os.readlink(entry.path) if entry.is_symlink() else None
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            found[os.path.relpath(entry.path, root)] = (stat.S_IFMT(st.st_mode), size, st.st_mtime_ns, target)
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path)

    walk(str(root))
    return found


def diff_snapshots(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    changes = [f"removed {k}" for k in sorted(before.keys() - after.keys())]
    changes += [f"created {k}" for k in sorted(after.keys() - before.keys())]
    changes += [f"changed {k}: {before[k]} -> {after[k]}" for k in sorted(before.keys() & after.keys())
                if before[k] != after[k]]  # fmt: skip
    return changes


@dataclasses.dataclass
class Outside:
    """A sibling of the save dir holding things a hostile layout points at: a real weights file, a checkpoint
    copy, a text file, blob-like files. ``assert_unchanged`` compares everything under the test's root except the
    save dir with the snapshot taken by ``seal``."""

    root: Path  # the test's tmp_path
    save_dir: Path
    dir: Path
    before: dict[str, tuple] = dataclasses.field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.dir / "weights.pt"

    @property
    def notes(self) -> Path:
        return self.dir / "notes.txt"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "run" / "checkpoints" / "step_00000009"

    def seal(self) -> None:
        self.before = snapshot(self.root, exclude=[self.save_dir])

    def assert_unchanged(self) -> None:
        changes = diff_snapshots(self.before, snapshot(self.root, exclude=[self.save_dir]))
        assert not changes, "outside the save dir: " + "; ".join(changes[:10])


def make_outside(root: Path, save_dir: Path) -> Outside:
    outside = Outside(root, save_dir, root / "outside")
    outside.dir.mkdir()
    model = small_model(blob_sized=True)
    with torch.no_grad():
        model.weight.fill_(7.0)  # recognisable: never the run's own weights
    torch.save(model.state_dict(), outside.weights)
    outside.notes.write_text("an operator's notes; nothing may touch them\n")
    make_run(outside.dir / "run", steps=(9,), fmt="differential")  # a whole checkpoint with blobs, outside
    blob_shard = outside.dir / "blobs" / "ab"
    blob_shard.mkdir(parents=True)
    (blob_shard / ("ab" + "0" * 30 + ".raw")).write_bytes(b"x" * 100)  # named like a blob
    return outside


# ----------------------------------------------------------------------------------------------------- audit
_AUDIT: list | None = None
_IN_HOOK = threading.local()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _real(path: Any, follow: bool) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return None
    absolute = os.path.abspath(path)
    if follow:
        return os.path.realpath(absolute)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _hook(event: str, args: tuple) -> None:
    records = _AUDIT
    if records is None or getattr(_IN_HOOK, "busy", False):
        return
    _IN_HOOK.busy = True
    try:
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            nofollow = isinstance(flags, int) and flags & os.O_NOFOLLOW
            real = _real(path, follow=not nofollow)
            if real is not None:
                records.append(("write" if writes else "read", real))
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                       "os.chmod", "os.chown", "os.utime"):  # fmt: skip
            index = 1 if event in ("os.symlink", "os.link") else 0  # symlink(src, dst): dst is what is made
            dir_fd = args[-1] if event in ("os.remove", "os.rmdir", "shutil.rmtree", "os.mkdir") else None
            if isinstance(dir_fd, int):  # relative to a directory fd (inside rmtree): covered by its own event
                return
            real = _real(args[index], follow=False)
            if real is not None:
                records.append(("delete" if event in ("os.remove", "os.rmdir", "shutil.rmtree") else "write", real))
        elif event == "os.rename":
            if isinstance(args[2], int) or isinstance(args[3], int):
                return
            for path in args[:2]:
                real = _real(path, follow=False)
                if real is not None:
                    records.append(("rename", real))
        elif event in ("os.listdir", "os.scandir"):
            real = _real(args[0], follow=True)
            if real is not None:
                records.append(("list", real))
    finally:
        _IN_HOOK.busy = False


sys.addaudithook(_hook)


@contextlib.contextmanager
def audit() -> Iterator[list[tuple[str, str]]]:
    """Record (kind, resolved path) of every open, listing, creation, rename and deletion made by Python code in
    this process (torch's C++ reads go through a Python ``open`` first) while the block runs."""
    global _AUDIT
    records: list[tuple[str, str]] = []
    _AUDIT = records
    try:
        yield records
    finally:
        _AUDIT = None


def inside(path: str, directory: Path) -> bool:
    base = os.path.realpath(directory)
    return path == base or path.startswith(base + os.sep)


def escapes(records: Iterable[tuple[str, str]], root: Path, save_dir: Path,
            allowed: Iterable[Path] = ()) -> list[tuple[str, str]]:  # fmt: skip
    """Records that touched something under ``root`` (the test's tmp dir) outside ``save_dir`` and ``allowed``
    (opening or listing a directory above the save dir, as fsyncing a parent after a mkdir does, is not one)."""
    keep = [save_dir, *allowed]
    above = {os.path.realpath(p) for p in [save_dir, *Path(os.path.abspath(save_dir)).parents]}
    return [(kind, path) for kind, path in records
            if inside(path, root) and not any(inside(path, k) for k in keep)
            and not (kind in ("read", "list") and path in above)]  # fmt: skip


def files_read_in(records: Iterable[tuple[str, str]], directory: Path) -> set[str]:
    """Names (relative to ``directory``) opened for reading under it."""
    base = os.path.realpath(directory)
    return {os.path.relpath(path, base) for kind, path in records if kind == "read" and inside(path, directory)}


# ------------------------------------------------------------------------------------------ operator commands
@dataclasses.dataclass
class Result:
    code: int | None
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(*args: str, cwd: Path | None = None) -> Result:
    """``python -m telepathy ARGS`` in this process: its exit code (returned or raised) and its output; an
    exception escaping ``main`` is rendered as a traceback, as the program would print it."""
    from telepathy.__main__ import main  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    handler = logging.StreamHandler(err)  # the library's warnings, as a program's stderr would show them
    logger = logging.getLogger("telepathy")
    logger.addHandler(handler)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 (what a program would die with)
                import traceback  # noqa: PLC0415

                err.write(traceback.format_exc())
                code = 1
    finally:
        logger.removeHandler(handler)
        os.chdir(previous)
    return Result(code, out.getvalue(), err.getvalue())


def parse_in_process(parse: Callable[[list[str]], Any], argv: list[str]) -> Result:
    """An argument parser called in-process: exit code 0 when it accepted ``argv``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            parse(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001
            import traceback  # noqa: PLC0415

            err.write(traceback.format_exc())
            code = 1
    return Result(code, out.getvalue(), err.getvalue())


def program(module: str, *args: str, timeout: float = 120, cwd: Path | None = None,
            env: Mapping[str, str] | None = None, limit_memory: int | None = None) -> Result:  # fmt: skip
    """``python -m MODULE ARGS`` as a real process (exit code, stdout, stderr). ``limit_memory``: bytes of address
    space it may use (RLIMIT_AS), so that an unbounded allocation fails instead of exhausting the machine. A
    process that runs past ``timeout`` is killed and reported with code None."""

    def limit() -> None:
        if limit_memory is not None:
            import resource  # noqa: PLC0415

            resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, env=full_env, preexec_fn=limit, errors="replace")  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Result(None, out, err + f"\n<killed after {timeout} s>")
    return Result(done.returncode, done.stdout, done.stderr)


def python_code(code: str, *args: str, timeout: float = 60, limit_memory: int | None = None) -> Result:
    """``python -c CODE ARGS`` as a real process (see :func:`program`)."""

    def limit() -> None:
        if limit_memory is not None:
            import resource  # noqa: PLC0415

            resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    try:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limit, errors="replace")  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Result(None, out, err + f"\n<killed after {timeout} s>")
    return Result(done.returncode, done.stdout, done.stderr)


def error_lines(text: str) -> list[str]:
    """The lines of an error report, without argparse's usage block."""
    lines = [line for line in text.splitlines() if line.strip()]
    if any(": error: " in line for line in lines):
        return [line for line in lines if ": error: " in line]
    return lines


def assert_one_line_error(result: Result, code: int = 2) -> None:
    """Exit ``code``, no traceback, and the complaint on exactly one line (of stderr; of stdout for a program that
    logs there, as the trainers do, when stderr is empty)."""
    assert "Traceback" not in result.text, result.text[-3000:]
    assert result.code == code, f"exit {result.code}, expected {code}: {result.text[-2000:]}"
    lines = error_lines(result.err if result.err.strip() else result.out)
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {result.text[-2000:]}"


def assert_no_traceback(result: Result) -> None:
    assert result.code is not None, "hung: " + result.text[-2000:]
    assert "Traceback" not in result.text, result.text[-3000:]


# ------------------------------------------------------------------------------------------------ filesystems
@contextlib.contextmanager
def tmpfs(mount: Path, options: str = "size=1m") -> Iterator[Path]:
    """A small tmpfs at ``mount`` (root only: the caller skips otherwise); unmounted afterwards."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        raise OSError(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)


@contextlib.contextmanager
def read_only_view(source: Path, mount: Path) -> Iterator[Path]:
    """``source`` mounted read-only at ``mount`` (a bind mount; root only)."""
    mount.mkdir(parents=True, exist_ok=True)
    for command in (["mount", "--bind", str(source), str(mount)], ["mount", "-o", "remount,bind,ro", str(mount)]):
        done = subprocess.run(command, capture_output=True)
        if done.returncode:
            subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)
            raise OSError(f"cannot make a read-only bind mount: {done.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def fill_blocks(mount: Path, leave: int = 0) -> Path:
    """Fill a filesystem's free space, leaving about ``leave`` bytes."""
    filler = mount / "filler"
    with open(filler, "ab") as f:
        while True:
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
            except OSError:
                break
    return filler


def fill_inodes(mount: Path) -> Path:
    """Use up a filesystem's inodes (then creating any file or directory fails with ENOSPC)."""
    holder = mount / "inodes"
    holder.mkdir()
    n = 0
    while True:
        try:
            (holder / str(n)).touch()
        except OSError:
            return holder
        n += 1
