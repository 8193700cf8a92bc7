"""``compress export``: ONNX with decoded outputs, checked against torch in onnxruntime."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..export import export_onnx, onnx_parity
from ..model.artifact import load_model
from .common import add_model_args


def register(sub):
    """Add the ``export`` subcommand."""
    p = sub.add_parser("export", help="export to ONNX (decoded outputs) and check it in onnxruntime")
    add_model_args(p, imgsz=640)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and image size axes")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--out", default=None, help="output .onnx file (default: beside the weights, model.onnx)")
    p.set_defaults(func=run)


def default_onnx_path(weights) -> Path:
    """``RUN_DIR/model.onnx`` for an artifact, ``X.onnx`` beside any other weights file."""
    p = Path(weights)
    return p / "model.onnx" if p.is_dir() else p.with_suffix(".onnx")


def run(args):
    """Export, then compare onnxruntime with torch and print the max abs difference."""
    if not args.weights and not args.cfg:
        raise UserError("give --weights (artifact dir or .pt) or --cfg")
    model = load_model(args.cfg, args.weights) if args.weights else load_model(args.cfg)
    out = Path(args.out) if args.out else default_onnx_path(args.weights or Path(args.cfg).stem)
    export_onnx(model, out, args.imgsz, dynamic=args.dynamic, opset=args.opset)
    diff = onnx_parity(model, out, args.imgsz)
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB); onnxruntime vs torch max abs diff {diff:.2e} "
          f"(boxes / imgsz, scores)")
    if diff > 1e-4:
        print(f"warning: max abs difference {diff:.2e} exceeds 1e-4")
        return 1
    return 0
