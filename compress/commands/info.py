"""``compress info``: params, GFLOPs and a per-layer table of a model YAML or checkpoint."""
from __future__ import annotations

from ..errors import UserError
from ..model.artifact import load_model
from ..model.profile import layer_table
from ..tables import format_table
from .common import add_model_args


def register(sub):
    """Add the ``info`` subcommand."""
    p = sub.add_parser("info", help="params, GFLOPs and per-layer table of a model",
                       description="Print params, GFLOPs (thop) and a per-layer table of a model YAML or weights.")
    add_model_args(p, imgsz=640)
    p.set_defaults(func=run)


def run(args):
    """Print the model summary."""
    if not args.cfg and not args.weights:
        raise UserError("give --cfg MODEL.yaml and/or --weights W")
    model = load_model(args.cfg, args.weights) if args.weights else load_model(args.cfg)
    headers, rows, prof = layer_table(model, args.imgsz)
    print(format_table(headers, rows))
    src = args.weights or args.cfg
    print(f"\n{src}: {len(rows)} layers, {prof['params']:,} parameters, "
          f"{prof['gflops']:.2f} GFLOPs at {args.imgsz}x{args.imgsz}, nc={model.nc}")
    return 0
