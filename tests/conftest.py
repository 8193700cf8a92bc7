"""Shared fixtures: tiny models so the suite stays fast on 2 CPU cores."""
from __future__ import annotations

import pytest
import torch

from compress.model.yolo import load_cfg

torch.set_num_threads(2)


def tiny_cfg(name: str = "yolov5n", nc: int = 4, width: float = 0.125) -> dict:
    """A shipped config shrunk to a few thousand parameters (same topology)."""
    d = load_cfg(f"{name}.yaml")
    d["nc"] = nc
    if name.startswith("yolov5"):
        d["width_multiple"] = width
    d.pop("yaml_file", None)
    d["yaml_file"] = f"tiny-{name}"
    return d


@pytest.fixture
def tiny_yolo_cfg():
    """Tiny yolov5n-topology config dict (nc=4, width 0.125)."""
    return tiny_cfg()
