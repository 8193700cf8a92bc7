"""The real ultralytics checkpoint in ../shared/fixtures (not a pickle of fake classes).

``ultralytics_v5era_ki67_1class.pt`` was written by ultralytics' own train.py (YOLOv5s of the v5 era:
Focus stem, SPP, nc=1, fp16, a numpy ``best_fitness``). It is read in place, never copied into the
project. Small image sizes keep these tests to a few seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress import load_model, save_model
from compress.cli import main
from compress.model.ultralytics_ckpt import load_checkpoint

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
CKPT = FIXTURES / "ultralytics_v5era_ki67_1class.pt"
PARAMS = 7_063_542

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared fixtures folder {FIXTURES} is absent")


@pytest.fixture(scope="module")
def model():
    return load_model(weights=CKPT).eval()


def _image(size=256):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_real_checkpoint_imports(model):
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert model.nc == 1 and len(model.names) == 1
    kinds = {type(m).__name__ for m in model.model}
    assert type(model.model[0]).__name__ == "Focus" and "SPP" in kinds and "SPPF" not in kinds
    with torch.no_grad():
        pred = model(_image())[0]
    assert pred.shape == (1, 3 * (32 * 32 + 16 * 16 + 8 * 8), 6) and torch.isfinite(pred).all()


def test_real_checkpoint_contents():
    ck = load_checkpoint(CKPT)
    meta = ck["meta"]
    assert meta["model_class"] == "models.yolo.Model" and meta["source"] == "model"
    assert meta["stride"] == [8.0, 16.0, 32.0] and meta["epoch"] == -1
    # best_fitness is a numpy float64 array in the file (numpy.core.multiarray._reconstruct)
    assert isinstance(meta["best_fitness"], list) and 0 < meta["best_fitness"][0] < 1
    assert ck["cfg"]["nc"] == 1 and ck["cfg"]["backbone"][0][2] == "Focus"
    sd = ck["state_dict"]
    weights = [v for k, v in sd.items() if k.endswith(".weight")]
    assert all(v.dtype == torch.float32 for v in weights)
    assert all(torch.equal(v, v.half().float()) for v in weights)  # the file stores fp16


def test_forward_unchanged_after_save_and_load(model, tmp_path):
    again = load_model(save_model(model, tmp_path / "artifact")).eval()
    assert sum(p.numel() for p in again.parameters()) == PARAMS
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], model(x)[0], rtol=0, atol=0)


def test_prune_then_export_with_onnxruntime_parity(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--weights", str(CKPT), "--ratio", "0.3", "--imgsz", "320", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_before"] == PARAMS and report["params"] < PARAMS
    assert report["gflops"] < 0.8 * report["gflops_before"]
    onnx = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(out), "--imgsz", "320", "--out", str(onnx)]) == 0  # 1 if parity fails
    assert onnx.is_file() and "max abs diff" in capsys.readouterr().out

