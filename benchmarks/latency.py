"""onnxruntime CPU latency of models side by side, with params and GFLOPs.

    python benchmarks/latency.py yolov5s runs/prune/exp runs/prune/exp2 --imgsz 640 --runs 50 --threads 2

Each argument is an artifact directory, a weights file, or a model YAML / shipped config name (random
weights: latency does not depend on the values). Models are measured interleaved, round by round, so
that load on this shared machine hits them alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.export import export_onnx, ort_session  # noqa: E402
from compress.model.artifact import load_model  # noqa: E402
from compress.model.profile import profile  # noqa: E402
from compress.tables import format_table  # noqa: E402


def measure(models: list[str], imgsz: int, runs: int, threads: int, rounds: int = 5):
    """Export each model to ONNX and time them interleaved; returns one dict per model."""
    rows = []
    with tempfile.TemporaryDirectory() as td:
        sessions = []
        for i, m in enumerate(models):
            model = load_model(m)
            prof = profile(model, imgsz)
            path = export_onnx(model, Path(td) / f"m{i}.onnx", imgsz)
            sessions.append(ort_session(path, threads))
            rows.append({"model": m, "params": prof["params"], "gflops": prof["gflops"], "times": []})
        x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
        for s in sessions:  # warm-up
            for _ in range(3):
                s.run(None, {s.get_inputs()[0].name: x})
        per_round = max(1, runs // rounds)
        for _ in range(rounds):
            for s, r in zip(sessions, rows):
                for _ in range(per_round):
                    t = time.perf_counter()
                    s.run(None, {s.get_inputs()[0].name: x})
                    r["times"].append((time.perf_counter() - t) * 1e3)
    for r in rows:
        r["median_ms"] = statistics.median(r.pop("times"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="artifact dirs, weights files, or model YAMLs")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    a = ap.parse_args(argv)
    rows = measure(a.models, a.imgsz, a.runs, a.threads)
    base = rows[0]
    table = [[r["model"], r["params"], f"{r['gflops']:.2f}", f"{r['gflops'] / base['gflops']:.2f}",
              f"{r['median_ms']:.1f}", f"{r['median_ms'] / base['median_ms']:.2f}"] for r in rows]
    print(f"onnxruntime CPU, {a.threads} threads, {a.imgsz}x{a.imgsz}, median of {a.runs} runs")
    print(format_table(["model", "params", "GFLOPs", "FLOPs ratio", "latency ms", "latency ratio"], table))


if __name__ == "__main__":
    main()
