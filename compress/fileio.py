"""Atomic file writes, safe tensor loading and run-folder checks shared by every stage."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

    Readers never see a half-written file: the rename is atomic on POSIX filesystems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_yaml(path, obj) -> None:
    """Write ``obj`` as YAML to ``path`` atomically."""
    write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, width=120))


def save_torch(obj, path) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_tensors(path):
    """Load a file of tensors/containers with ``weights_only=True`` (never runs pickled code).

    Raises UserError naming the file when it is missing, truncated or not a plain tensor file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / unsafe files
        text = " ".join(str(e).split())
        if "weights_only" in text or "Unsupported global" in text or "Unsupported operand" in text:
            why = ("it holds pickled objects, not only tensors (an ultralytics .pt? pass it as --weights "
                   "alone, without --cfg)")
        elif isinstance(e, (EOFError, RuntimeError, OSError)) and ("zip" in text or "archive" in text
                                                                   or isinstance(e, EOFError)):
            why = "truncated or corrupt"
        else:
            why = f"not a torch.save file of tensors: {text[:120] or type(e).__name__}"
        raise UserError(f"{path}: not a readable weights file ({why})") from None


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


UNFINISHED = ".unfinished.json"


def check_output_dir(path, flag: str = "--out", taken=(), resume: bool = False) -> Path:
    """Check, before any work, that ``path`` can become a run folder; returns it as a Path.

    Refused with one line: a file at ``path``, a folder that already holds one of ``taken`` (a finished
    artifact; allowed when ``resume``), or a place where nothing can be created. Nothing is written.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder")
    if p.is_dir() and not resume:
        held = [n for n in taken if (p / n).exists()]
        if held:
            raise UserError(f"{flag} {path}: already holds a run ({held[0]}); give a new folder, or leave out "
                            f"{flag} for a fresh runs/<command>/exp folder")
    check_writable(p, flag)
    return p


def check_output_file(path, flag: str = "--out") -> Path:
    """Check, before any work, that a file can be written at ``path`` (not a folder, a writable place)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name (e.g. {p / 'model.onnx'})")
    check_writable(p.parent, flag, shown=path)
    return p


def check_writable(path, flag: str = "--out", shown=None) -> None:
    """UserError unless a folder can be created at (or already exists and is writable at) ``path``.

    Tries for real (a scratch folder made and removed in the nearest existing ancestor), since
    permission bits say nothing for root or read-only mounts.
    """
    p = Path(path).absolute()
    anc = p
    while not anc.exists():
        anc = anc.parent
    shown = path if shown is None else shown
    if not anc.is_dir():
        raise UserError(f"{flag} {shown}: {anc} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".compress-write-check-", dir=anc))
    except OSError as e:
        raise UserError(f"{flag} {shown}: cannot write in {anc} ({e.strerror or e})") from None


@contextlib.contextmanager
def unfinished_run(folder, stage: str, enabled: bool = True, **info):
    """Mark ``folder`` unfinished while a stage writes into it; the mark goes only when the stage succeeds.

    A folder with the mark is refused as ``--weights`` (it may hold a partial artifact) and is what a
    recipe rerun resumes. Yields the folder (created if needed). ``enabled=False`` (a torchrun process
    other than rank 0) neither creates nor marks anything.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / UNFINISHED, {"stage": stage, "pid": os.getpid(), **info})
    yield folder
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / UNFINISHED)


def unfinished_stage(folder) -> str | None:
    """The stage that left ``folder`` unfinished (crashed or still running), or None."""
    f = Path(folder) / UNFINISHED
    if not f.is_file():
        return None
    try:
        return str(json.loads(f.read_text()).get("stage") or "?")
    except (json.JSONDecodeError, OSError, AttributeError):
        return "?"


def new_run_dir(command: str, name: str = "exp", root="runs") -> Path:
    """Return ``runs/<command>/<name>``, or ``<name>2``, ``<name>3`` ... if it exists (ultralytics style)."""
    base = Path(root) / command
    d = base / name
    i = 2
    while d.exists():
        d = base / f"{name}{i}"
        i += 1
    return d
