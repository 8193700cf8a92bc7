"""``compress prune``: one-shot structured pruning to a FLOPs budget (L1 or BN-gamma importance)."""
from __future__ import annotations

import torch

from ..errors import UserError
from ..model.artifact import load_model, save_model
from ..model.profile import check_imgsz
from ..prune import (
    apply_plan_to_model, channel_groups, group_scores, keep_counts_for_ratio, plan_from_counts,
)
from ..prune.report import groups_summary, layer_rows, plot_channels
from ..tables import format_table
from .common import add_model_args, add_out_arg, out_dir

RATIO_HELP = ("share of the model's FLOPs to REMOVE, in (0, 1): 0.5 leaves at most half of the GFLOPs "
              "at --imgsz (thop convention, whole model). Like torch-pruning's pruning_ratio, but of FLOPs, "
              "not channels; the achieved ratio is printed")


def register(sub):
    """Add the ``prune`` subcommand."""
    p = sub.add_parser(
        "prune", help="structured channel pruning to a FLOPs budget (one shot)",
        description="Remove whole channels (coupled groups: residual adds, concats, SPPF, Detect inputs) "
                    "until the model's FLOPs shrink by --ratio; every pruned group keeps a multiple of "
                    "--round-to channels. Writes model.yaml + weights.pt + report.json + channels.png.")
    add_model_args(p, imgsz=640)
    p.add_argument("--ratio", type=float, required=True, help=RATIO_HELP)
    p.add_argument("--method", default="l1", choices=["l1", "bn"],
                   help="channel importance: l1 = L1 norm of the producing filters, bn = BN |gamma| (default l1)")
    p.add_argument("--global", dest="global_", action="store_true",
                   help="rank channels globally (importance normalised per group by its mean) instead of the "
                        "same channel ratio in every group")
    p.add_argument("--round-to", type=int, default=8,
                   help="every pruned group keeps a multiple of this many channels (nearest; default 8)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="LAYER",
                   help="layers or groups not to prune: a layer index (0), a module path (model.2.cv1) "
                        "or a group name; comma-separated or repeated")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights of --cfg without --weights")
    add_out_arg(p)
    p.set_defaults(func=run)


def run(args):
    """Prune, save the artifact and print the per-layer table."""
    if not 0 < args.ratio < 1:
        raise UserError(f"--ratio {args.ratio}: must be in (0, 1) (the share of FLOPs to remove)")
    if args.round_to < 1:
        raise UserError(f"--round-to {args.round_to}: must be a positive integer")
    if not args.weights and not args.cfg:
        raise UserError("give --weights (artifact dir or .pt) and/or --cfg MODEL.yaml")
    if args.weights:
        model = load_model(args.cfg, args.weights)
    else:
        torch.manual_seed(args.seed)
        model = load_model(args.cfg)
    model.eval()
    check_imgsz(model, args.imgsz)

    cg = channel_groups(model).exclude(args.exclude)
    scores = group_scores(cg, model.state_dict(), args.method)
    mode = "global" if args.global_ else "uniform"
    counts = keep_counts_for_ratio(cg, 1 - args.ratio, args.imgsz, scores, mode=mode, round_to=args.round_to)
    plan = plan_from_counts(cg, counts, scores)
    pruned = apply_plan_to_model(model, plan, cg)

    cm = cg.cost_model(args.imgsz)
    before, after = cm.per_layer(), cm.per_layer(counts)
    g0, g1 = cm.gflops(), cm.gflops(counts)
    p0, p1 = cm.params(), cm.params(counts)
    headers, rows = layer_rows(cg, cm, counts, before, after)
    print(format_table(headers, rows))

    out = out_dir(args, "prune")
    report = {
        "stage": "prune",
        "parent": str(args.weights or args.cfg),
        "options": {"ratio": args.ratio, "method": args.method, "global": args.global_,
                    "round_to": args.round_to, "exclude": list(args.exclude), "imgsz": args.imgsz,
                    "cfg": args.cfg, "weights": args.weights},
        "imgsz": args.imgsz,
        "params_before": p0, "params": p1,
        "gflops_before": g0, "gflops": g1,
        "flops_kept": g1 / g0, "flops_removed": 1 - g1 / g0,
        "groups": groups_summary(cg, counts),
        "layers": [dict(zip(headers, r)) for r in rows],
    }
    save_model(pruned, out, report=report)
    plot_channels(cg, counts, out / "channels.png")
    print(f"\npruned {args.weights or args.cfg} ({args.method}, {mode}, round to {args.round_to}): "
          f"{g0:.3f} -> {g1:.3f} GFLOPs at {args.imgsz} (kept {g1 / g0:.1%}, removed {1 - g1 / g0:.1%}; "
          f"asked to remove {args.ratio:.1%}), params {p0:,} -> {p1:,}")
    print(f"wrote {out} (model.yaml, weights.pt, report.json, channels.png)")
    return 0
