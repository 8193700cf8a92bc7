"""ONNX export with decoded outputs, an onnxruntime parity check, and onnxruntime CPU latency."""
from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .fileio import atomic_path
from .model.profile import check_imgsz


class DecodedOutput(nn.Module):
    """Wraps a detector so that forward returns only the decoded predictions (B, anchors, 5 + nc)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def export_onnx(model, path, imgsz: int = 640, dynamic: bool = False, opset: int = 17, batch: int = 1) -> Path:
    """Export ``model`` (eval mode, decoded outputs) to ONNX at ``path``, atomically.

    Uses the TorchScript exporter with constant folding (the graph's shape arithmetic folds away);
    ``dynamic`` makes batch, height and width dynamic axes.
    """
    check_imgsz(model, imgsz)
    model = model.float().cpu().eval()
    x = torch.zeros(batch, 3, imgsz, imgsz)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}} if dynamic else None
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(DecodedOutput(model).eval(), (x,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["output0"], dynamic_axes=axes,
                          do_constant_folding=True)
        import onnx

        onnx.checker.check_model(onnx.load(str(tmp)))
    return path


def ort_session(path, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads when given)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_parity(model, path, imgsz: int, batch: int = 1, seed: int = 0) -> float:
    """Max abs difference between torch and onnxruntime decoded outputs on a random image batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    with torch.no_grad():
        ref = model.float().cpu().eval()(x)[0].numpy()
    sess = ort_session(path)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(out - ref).max())


def onnx_latency(path, imgsz: int, runs: int = 50, warmup: int = 5, threads: int | None = None) -> dict:
    """onnxruntime CPU latency of an ONNX model on a 1 x 3 x imgsz x imgsz input.

    Returns ``{"median_ms", "p90_ms", "runs", "threads"}``.
    """
    sess = ort_session(path, threads)
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "runs": runs, "threads": threads or 0}
