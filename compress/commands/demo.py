"""``compress demo``: the whole pipeline on the built-in synthetic dataset, in one command."""
from __future__ import annotations

from pathlib import Path

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def register(sub):
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="synthesize data, train, EagleEye-prune, fine-tune, QAT (TensorRT), export",
                       description="Run the built-in demo recipe: synthetic dataset -> train yolov5n -> EagleEye "
                                   "at 0.6 FLOPs -> fine-tune (the unpruned model as teacher) -> MQBench QAT "
                                   "for TensorRT -> deploy files, then print the summary (params, GFLOPs, "
                                   "latency, mAP).")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo; a rerun resumes it)")
    p.add_argument("--smoke", action="store_true", help="a one-minute version of the same stages")
    p.set_defaults(func=run)


def run(args):
    """Run the demo recipe."""
    from ..recipe import run_recipe

    print(f"compress demo: recipe {DEMO_RECIPE}, output {args.out}")
    run_recipe(DEMO_RECIPE, args.out, smoke=args.smoke)
    return 0
