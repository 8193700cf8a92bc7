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
    add_sparsity_args(p)
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
    p.add_argument("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"],
                   help="optimizer (with Adam/AdamW use a smaller lr0, e.g. --hyp adamw-fast)")
    p.add_argument("--nbs", type=int, default=64,
                   help="nominal batch size: gradients are accumulated to it before each step (ultralytics 64)")
    p.add_argument("--patience", type=int, default=0, help="stop after this many epochs without improvement (0: off)")


def add_sparsity_args(p):
    """Network Slimming's sparsity training flags (``compress train --sparsity S``)."""
    from ..prune.slim import SCHEDULES

    g = p.add_argument_group("sparsity training (Network Slimming; then `compress slim`)")
    g.add_argument("--sparsity", type=float, default=None, metavar="S",
                   help="add S * sign(gamma) to the gradient of every prunable BatchNorm gamma (L1 penalty), "
                        "e.g. 1e-3; logs the share of gammas below 1e-2/1e-3 and gamma_hist.png each epoch")
    g.add_argument("--sparsity-schedule", choices=SCHEDULES, default=None,
                   help="constant (default) or cosine-decay (S in the first epoch after warmup down to 0.01*S "
                        "in the last)")
    g.add_argument("--sparsity-warmup-epochs", type=int, default=None, metavar="K",
                   help="no L1 term in the first K epochs (default 0)")
    g.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="LAYER",
                   help="with --sparsity: layers or groups whose gammas get no L1 term (as `compress slim "
                        "--exclude`; give the same to both)")


def sparsity_options(args) -> dict:
    """The sparsity flags as ``TrainOptions.extra`` entries (``{}`` without --sparsity); checks them."""
    from ..prune.slim import SparsityCallback

    s = getattr(args, "sparsity", None)
    if s is None:
        for flag, v in (("--sparsity-schedule", getattr(args, "sparsity_schedule", None)),
                        ("--sparsity-warmup-epochs", getattr(args, "sparsity_warmup_epochs", None)),
                        ("--exclude", getattr(args, "exclude", None) or None)):
            if v is not None:
                raise UserError(f"{flag} only applies to sparsity training: add --sparsity S (e.g. 1e-3)")
        return {}
    cb = SparsityCallback(s, args.sparsity_schedule or "constant", args.sparsity_warmup_epochs or 0,
                          args.exclude)
    return cb.options()


def options_from_args(args, command="train"):
    """TrainOptions from parsed CLI args."""
    from ..engine.trainer import TrainOptions

    if not args.data:
        raise UserError("--data DATA.yaml is required")
    return TrainOptions(data=args.data, cfg=args.cfg, weights=args.weights, epochs=args.epochs,
                        imgsz=args.imgsz, batch=args.batch, hyp=args.hyp, device=args.device,
                        workers=args.workers, out=str(out_dir(args, command)), seed=args.seed,
                        cos_lr=args.cos_lr, sync_bn=args.sync_bn, patience=args.patience, nbs=args.nbs,
                        optimizer=args.optimizer,
                        extra=sparsity_options(args))


def callbacks_from_options(extra: dict) -> list:
    """Callbacks recorded in ``TrainOptions.extra`` (opt.yaml), so ``--resume`` restores them."""
    from ..prune.slim import SparsityCallback

    cb = SparsityCallback.from_options(extra or {})
    return [cb] if cb else []


def saved_extra(run_dir) -> dict:
    """The ``extra`` options in a run folder's opt.yaml (``{}`` when it has none or is unreadable)."""
    import yaml

    f = Path(run_dir) / "opt.yaml"
    try:
        d = yaml.safe_load(f.read_text()) if f.is_file() else {}
    except yaml.YAMLError:
        return {}
    return (d or {}).get("extra") or {} if isinstance(d, dict) else {}


def run(args):
    """Train, fine-tune or resume."""
    from ..engine.trainer import resume, save_options, train

    if args.resume:
        run_dir = Path(args.resume if isinstance(args.resume, str) else (args.out or ""))
        if not str(run_dir):
            raise UserError("--resume needs the run folder (--resume DIR or --out DIR)")
        extra = saved_extra(run_dir)
        if getattr(args, "sparsity", None) is not None and args.sparsity != extra.get("sparsity"):
            print(f"note: --resume continues with the options saved in {run_dir / 'opt.yaml'} "
                  f"(sparsity {extra.get('sparsity')}); --sparsity {args.sparsity} is ignored")
        resume(run_dir, callbacks_from_options(extra))
        return 0
    opts = options_from_args(args)
    if int(os.environ.get("RANK", 0)) == 0:
        save_options(opts)
    train(opts, callbacks_from_options(opts.extra))
    return 0
