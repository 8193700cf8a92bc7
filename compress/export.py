"""ONNX export with decoded outputs, an onnxruntime parity check, and onnxruntime CPU latency."""
from __future__ import annotations

import copy
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
    """An onnxruntime CPU session for ``path`` or serialized model bytes (``threads`` intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # idle worker threads must not spin: with several sessions timed side by side, one session's spinning
    # threads would steal the cores of the next
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def parity_report(model, path, imgsz: int, batch: int = 1, seed: int = 0) -> dict:
    """How far onnxruntime's decoded outputs are from torch's on a random image batch.

    Box coordinates are compared in units of the image size (pixels / imgsz) and scores as they are, so
    a tolerance means the same at 320 and at 1280. ``max_abs_diff``: onnxruntime vs torch in float32;
    ``ort_vs_float64`` and ``torch_vs_float64``: each against torch in float64, the exact result that both
    float32 runs approximate. The last is the float32 noise floor of this model: after an adaptive
    BatchNorm recalibration on a few images a running variance can be tiny, the folded conv weights large,
    and torch's own float32 result then differs from the exact one by more than 1e-4.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    m = model.float().cpu().eval()
    with torch.no_grad():
        ref = m(x)[0].numpy()
        exact = copy.deepcopy(m).double()(x.double())[0].numpy()
    sess = ort_session(path)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    scale = np.ones(ref.shape[-1], dtype=np.float64)
    scale[:4] = imgsz

    def dist(a, b):
        return float((np.abs(a.astype(np.float64) - b) / scale).max())

    return {"max_abs_diff": dist(out, ref), "ort_vs_float64": dist(out, exact), "torch_vs_float64": dist(ref, exact)}


def onnx_parity(model, path, imgsz: int, batch: int = 1, seed: int = 0) -> float:
    """Max abs difference between torch and onnxruntime decoded outputs (see :func:`parity_report`)."""
    return parity_report(model, path, imgsz, batch, seed)["max_abs_diff"]


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


def compare_latency(models: dict, imgsz: int, runs: int = 50, threads: int = 2, rounds: int = 5) -> list:
    """onnxruntime latency of several models measured side by side (interleaved rounds).

    ``models`` maps a label to a loaded model; each is exported to a temporary ONNX file. Interleaving
    the rounds makes load on a shared machine hit every model alike, so ratios are trustworthy.
    Returns one ``{"model", "params", "gflops", "median_ms"}`` dict per model, in order.
    """
    import tempfile

    from .model.profile import profile

    rows, sessions = [], []
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    with tempfile.TemporaryDirectory() as td:
        for i, (label, model) in enumerate(models.items()):
            prof = profile(model, imgsz)
            sess = ort_session(export_onnx(model, Path(td) / f"m{i}.onnx", imgsz), threads)
            for _ in range(3):  # warm-up
                sess.run(None, {sess.get_inputs()[0].name: x})
            sessions.append(sess)
            rows.append({"model": label, "params": prof["params"], "gflops": prof["gflops"], "times": []})
        per_round = max(1, runs // rounds)
        for _ in range(rounds):
            for sess, r in zip(sessions, rows):
                name = sess.get_inputs()[0].name
                for _ in range(per_round):
                    t = time.perf_counter()
                    sess.run(None, {name: x})
                    r["times"].append((time.perf_counter() - t) * 1e3)
    for r in rows:
        r["median_ms"] = statistics.median(r.pop("times"))
    return rows


def latency_table(rows: list, markdown: bool = False) -> str:
    """Table of :func:`compare_latency` rows with FLOPs and latency ratios to the first model."""
    from .tables import format_table

    b = rows[0]
    table = [[r["model"], r["params"], f"{r['gflops']:.2f}", f"{r['gflops'] / b['gflops']:.2f}",
              f"{r['median_ms']:.1f}", f"{r['median_ms'] / b['median_ms']:.2f}"] for r in rows]
    return format_table(["model", "params", "GFLOPs", "FLOPs ratio", "latency ms", "latency ratio"], table,
                        markdown=markdown)
