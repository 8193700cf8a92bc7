"""onnxruntime CPU latency of models side by side, with params and GFLOPs.

    python benchmarks/latency.py yolov5s runs/prune/exp runs/prune/exp2 --imgsz 640 --runs 50 --threads 2

Each argument is an artifact directory, a weights file, or a model YAML / shipped config name (random
weights: latency does not depend on the values). Models are measured interleaved, round by round, so
that load on this shared machine hits them alike. Same code as `compress bench`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--weights", *sys.argv[1:]]))
