"""``compress eagleeye``: EagleEye sub-net search (random layer-wise pruning + adaptive BN scoring)."""
from __future__ import annotations

from .common import add_model_args, add_out_arg, out_dir


def register(sub):
    """Add the ``eagleeye`` subcommand."""
    p = sub.add_parser(
        "eagleeye", help="EagleEye search: many random pruning strategies at a FLOPs budget, best one kept",
        description="Sample --candidates random per-group channel keep ratios, each placed inside the FLOPs "
                    "window --remain-ratio +- --delta, keep the highest-L1 filters, re-estimate BatchNorm "
                    "statistics on --bn-batches training batches (adaptive BN) and score on --eval-batches "
                    "validation batches. Writes the best sub-net (model.yaml + weights.pt + report.json), "
                    "top/1..K, candidates.jsonl, scatter.png and channels.png; fine-tune the result with "
                    "`compress train --weights OUT`. Under torchrun the candidates are shared across processes.")
    add_model_args(p, imgsz=320)
    p.add_argument("--data", required=False, help="dataset data.yaml (adaptive BN uses train, scoring val)")
    p.add_argument("--remain-ratio", type=float, required=True,
                   help="share of the model's FLOPs the sub-net keeps, in (0, 1] (thop convention at --imgsz)")
    p.add_argument("--candidates", type=int, default=200, help="number of strategies to sample (default 200)")
    p.add_argument("--delta", type=float, default=0.02,
                   help="every candidate's FLOPs lie within remain-ratio +- delta of the original (default 0.02)")
    p.add_argument("--min-remain", type=float, default=0.2, help="smallest per-group channel keep ratio (default 0.2)")
    p.add_argument("--max-remain", type=float, default=1.0, help="largest per-group channel keep ratio (default 1.0)")
    p.add_argument("--bn-batches", type=int, default=20, help="training batches for adaptive BN (default 20)")
    p.add_argument("--eval-batches", type=int, default=10, help="validation batches to score on (default 10)")
    p.add_argument("--batch", "--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--metric", default="map50", choices=["map50", "map"],
                   help="score: mAP@0.5 (map50) or mAP@0.5:0.95 (map) (default map50)")
    p.add_argument("--top-k", type=int, default=5, help="how many of the best to write as artifacts (top/1..K)")
    p.add_argument("--seed", type=int, default=0,
                   help="candidate i's strategy depends only on (seed, i); also picks the batches")
    p.add_argument("--round-to", type=int, default=8,
                   help="every pruned group keeps a multiple of this many channels (default 8)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="LAYER",
                   help="layers or groups not to prune: a layer index (0), a module path (model.2.cv1) or a "
                        "group name")
    p.add_argument("--device", default="cpu", help="cpu, 0, cuda:0 ... (under torchrun: each rank its own GPU)")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers for loading the fixed batches")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in --out from its candidates.jsonl (done candidates are skipped)")
    add_out_arg(p)
    p.set_defaults(func=run)


def options_from_args(args):
    """EagleEyeOptions from parsed CLI args."""
    from ..errors import UserError
    from ..prune.eagleeye import EagleEyeOptions

    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR (the folder of the search to continue)")
    return EagleEyeOptions(
        data=args.data, weights=args.weights, cfg=args.cfg, remain_ratio=args.remain_ratio,
        candidates=args.candidates, delta=args.delta, min_remain=args.min_remain, max_remain=args.max_remain,
        bn_batches=args.bn_batches, eval_batches=args.eval_batches, batch=args.batch, metric=args.metric,
        top_k=args.top_k, seed=args.seed, round_to=args.round_to, exclude=list(args.exclude), imgsz=args.imgsz,
        out=str(out_dir(args, "eagleeye")), resume=args.resume, workers=args.workers, device=args.device)


def run(args):
    """Validate the options, then search (see :func:`compress.prune.eagleeye.search`)."""
    from ..prune.eagleeye import search, validate_options

    opts = options_from_args(args)
    validate_options(opts)  # before anything is loaded
    search(opts)
    return 0
