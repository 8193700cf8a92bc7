"""Atomic file writes and safe tensor loading shared by every stage."""
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
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable weights file ({msg[:200]})") from None


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def new_run_dir(command: str, name: str = "exp", root="runs") -> Path:
    """Return ``runs/<command>/<name>``, or ``<name>2``, ``<name>3`` ... if it exists (ultralytics style)."""
    base = Path(root) / command
    d = base / name
    i = 2
    while d.exists():
        d = base / f"{name}{i}"
        i += 1
    return d
