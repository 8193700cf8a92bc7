"""``compress info``: params, GFLOPs and a per-layer table of a model YAML or checkpoint."""
from __future__ import annotations

from ..options import ModelInput, add_arguments


def register(sub):
    """Add the ``info`` subcommand."""
    p = sub.add_parser("info", help="params, GFLOPs and per-layer table of a model",
                       description="Print params, GFLOPs (thop) and a per-layer table of a model YAML or weights.")
    add_arguments(p, ModelInput)
    p.set_defaults(func=run)


def run(args):
    """Print the model summary."""
    from ..model.profile import layer_table
    from ..stages.base import load_input_model, source_name
    from ..tables import format_table

    o = ModelInput.from_args(args).validate()
    model = load_input_model(o)
    imgsz = o.resolved_imgsz()
    headers, rows, prof = layer_table(model, imgsz)
    print(format_table(headers, rows))
    print(f"\n{source_name(o)}: {len(rows)} layers, {prof['params']:,} parameters, "
          f"{prof['gflops']:.2f} GFLOPs at {imgsz}x{imgsz}, nc={model.nc}")
    return 0
