"""``compress train``: train from a YAML, fine-tune an artifact, or resume an interrupted run."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .common import add_model_args, add_out_arg, out_dir


def register(sub):
    """Add the ``train`` subcommand."""
    p = sub.add_parser("train", help="train or fine-tune a detector (one loop for every stage)",
                       description="Train from --cfg, fine-tune --weights (any artifact, e.g. a pruned one), "
                                   "or --resume an interrupted run.")
    add_model_args(p, imgsz=320)
    add_train_args(p)
    add_out_arg(p)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume the run in --out (or the given run folder) from its last checkpoint")
    p.set_defaults(func=run)


def add_train_args(p, epochs=100):
    """Training flags shared by ``train``, ``qat`` and fine-tuning stages (ultralytics names)."""
    p.add_argument("--data", required=False, help="dataset data.yaml")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch", "--batch-size", type=int, default=16, help="batch size per process")
    p.add_argument("--hyp", default=None, help="hyperparameter YAML (ultralytics hyp.scratch-low keys)")
    p.add_argument("--device", default="cpu", help="cpu, 0, cuda:0 ...")
    p.add_argument("--workers", type=int, default=2, help="dataloader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cos-lr", action="store_true", help="cosine LR schedule (default linear)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    p.add_argument("--patience", type=int, default=0, help="stop after this many epochs without improvement (0: off)")


def options_from_args(args, command="train"):
    """TrainOptions from parsed CLI args."""
    from ..engine.trainer import TrainOptions

    if not args.data:
        raise UserError("--data DATA.yaml is required")
    return TrainOptions(data=args.data, cfg=args.cfg, weights=args.weights, epochs=args.epochs,
                        imgsz=args.imgsz, batch=args.batch, hyp=args.hyp, device=args.device,
                        workers=args.workers, out=str(out_dir(args, command)), seed=args.seed,
                        cos_lr=args.cos_lr, sync_bn=args.sync_bn, patience=args.patience)


def callbacks_from_args(args):
    """Callbacks that CLI flags switch on (e.g. --sparsity adds the slimming L1 term)."""
    return []


def run(args):
    """Train, fine-tune or resume."""
    from ..engine.trainer import resume, save_options, train

    if args.resume:
        run_dir = Path(args.resume if isinstance(args.resume, str) else (args.out or ""))
        if not str(run_dir):
            raise UserError("--resume needs the run folder (--resume DIR or --out DIR)")
        resume(run_dir, callbacks_from_args(args))
        return 0
    opts = options_from_args(args)
    if int(os.environ.get("RANK", 0)) == 0:
        save_options(opts)
    train(opts, callbacks_from_args(args))
    return 0
