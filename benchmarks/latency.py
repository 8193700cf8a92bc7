"""onnxruntime CPU latency of models side by side, with params and GFLOPs.

    python benchmarks/latency.py yolov5s runs/prune/exp runs/prune/exp2 --imgsz 640 --runs 50 --threads 2

Each argument is an artifact directory, a weights file, or a model YAML / shipped config name (random
weights: latency does not depend on the values). Models are measured interleaved, round by round, so
that load on this shared machine hits them alike. Same code as `compress bench`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from compress.options import add_arguments  # noqa: E402
from compress.stages.bench import BenchOptions, run  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="artifact dirs, weights files or model YAMLs (the first is the reference)")
    add_arguments(ap, BenchOptions, skip=("weights", "cfg"))
    args = ap.parse_args()
    run(BenchOptions.from_args(args, weights=args.models))
