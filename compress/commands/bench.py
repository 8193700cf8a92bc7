"""``compress bench``: onnxruntime CPU latency of one or more models, side by side."""
from __future__ import annotations

import argparse

from ..errors import UserError


def register(sub):
    """Add the ``bench`` subcommand."""
    p = sub.add_parser("bench", help="onnxruntime CPU latency (median) of models side by side",
                       description="Export each model to ONNX and time it in onnxruntime, interleaved, "
                                   "with params, GFLOPs and ratios to the first model.")
    p.add_argument("--weights", nargs="+", default=None,
                   help="artifact dirs, weights files or model YAMLs (the first is the reference)")
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--runs", type=int, default=50, help="timed runs per model")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--out", default=None, help="write report.json (latency of the first model) into this folder")
    p.set_defaults(func=run)


def run(args):
    """Measure and print the latency table."""
    from ..export import compare_latency, latency_table
    from ..fileio import write_json
    from ..model.artifact import load_model
    from ..model.profile import check_imgsz

    sources = list(args.weights or []) or ([args.cfg] if args.cfg else [])
    if not sources:
        raise UserError("give --weights W [W ...]")
    if args.runs < 1:
        raise UserError(f"--runs must be >= 1, got {args.runs}")
    models = {}
    for s in sources:
        m = load_model(s)
        check_imgsz(m, args.imgsz)
        models[str(s)] = m
    rows = compare_latency(models, args.imgsz, args.runs, args.threads)
    print(f"onnxruntime CPU, {args.threads} threads, {args.imgsz}x{args.imgsz}, median of {args.runs} runs")
    print(latency_table(rows))
    if args.out:
        r = rows[0]
        write_json(f"{args.out}/report.json", {"stage": "bench", "weights": r["model"], "imgsz": args.imgsz,
                                                "threads": args.threads, "params": r["params"],
                                                "gflops": r["gflops"], "latency_ms": r["median_ms"],
                                                "models": rows})
    return 0
