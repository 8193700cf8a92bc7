"""``compress slim``: Network Slimming, one global BN-|gamma| threshold over all prunable channels."""
from __future__ import annotations

from ..errors import UserError
from .common import add_model_args, add_out_arg, out_dir


def register(sub):
    """Add the ``slim`` subcommand."""
    p = sub.add_parser(
        "slim", help="Network Slimming: cut channels by one global BatchNorm |gamma| threshold",
        description="Remove the channels with the smallest BatchNorm |gamma| (one global threshold over all "
                    "prunable groups; a coupled group is scored by the mean |gamma| of its BNs) so that "
                    "--global-percent of the prunable channels go, round every group to a multiple of "
                    "--round-to, recalibrate BN statistics and evaluate. Train the weights with "
                    "`compress train --sparsity S` first; fine-tune the result with `compress train --weights`.")
    add_model_args(p, imgsz=320)
    p.add_argument("--data", required=True, help="dataset data.yaml (BN recalibration and evaluation)")
    p.add_argument("--global-percent", type=float, required=True,
                   help="share of the prunable channels to REMOVE, in [0, 1) (as in the reference tool)")
    p.add_argument("--round-to", type=int, default=8,
                   help="every pruned group keeps a multiple of this many channels (nearest, at least one "
                        "multiple; default 8)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="LAYER",
                   help="layers or groups not to prune: a layer index (0), a module path (model.2.cv1) "
                        "or a group name; comma-separated or repeated")
    p.add_argument("--batch", "--batch-size", type=int, default=16)
    p.add_argument("--bn-batches", type=int, default=20,
                   help="training batches for BatchNorm recalibration after the cut (default 20)")
    p.add_argument("--eval-batches", default="all",
                   help="val batches to evaluate on before/after (a number, or 'all', the default)")
    p.add_argument("--device", default="cpu", help="cpu, 0, cuda:0 ...")
    p.add_argument("--workers", type=int, default=2, help="dataloader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the BN recalibration / eval batch choice")
    add_out_arg(p)
    p.set_defaults(func=run)


def parse_eval_batches(value):
    """``'all'`` -> None, a positive integer string -> int; anything else is a UserError."""
    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--eval-batches {value}: give a positive number of batches or 'all'") from None
    if n < 1:
        raise UserError(f"--eval-batches {value}: give a positive number of batches or 'all'")
    return n


def run(args):
    """Slim, recalibrate, evaluate and save the artifact (see :func:`compress.prune.slim.slim`)."""
    from ..prune.slim import slim

    n_eval = parse_eval_batches(args.eval_batches)
    slim(args.weights, args.data, args.global_percent, cfg=args.cfg, round_to=args.round_to,
         exclude=args.exclude, imgsz=args.imgsz, batch=args.batch, bn_batches=args.bn_batches,
         eval_batches=n_eval, workers=args.workers, device=args.device, seed=args.seed,
         out=out_dir(args, "slim"))
    return 0
