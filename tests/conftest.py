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


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small on-disk synthetic YOLO dataset (32 train / 16 val images at 96 px, 4 classes)."""
    from compress.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=32, n_val=16, imgsz=96,
                                  classes=4, seed=0)


@pytest.fixture(scope="session")
def tiny_cfg_file(tmp_path_factory):
    """The tiny yolov5n config written to a YAML file (for CLI tests)."""
    import yaml

    f = tmp_path_factory.mktemp("cfg") / "tiny-yolov5n.yaml"
    d = tiny_cfg()
    d.pop("yaml_file")
    f.write_text(yaml.safe_dump(d))
    return f


def assert_pruned_equals_masked(model, pruned, plan, cg, x):
    """The physically pruned model computes what ``model`` computes with the plan's channels zeroed: raw
    outputs within 1e-5, decoded ones within 1e-4 (boxes are in pixels). Returns the pruned raw outputs."""
    import copy

    from compress.prune import mask_dropped_channels_

    masked = copy.deepcopy(model)
    mask_dropped_channels_(masked, plan, cg)
    with torch.no_grad():
        (dec_p, raw_p), (dec_m, raw_m) = pruned(x), masked(x)
    for a, b in zip(raw_p, raw_m):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(dec_p, dec_m, atol=1e-4, rtol=1e-5)
    return raw_p
