"""``compress data``: write the synthetic dataset (``synth``) or check a data.yaml's images and labels."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import check_writable, new_run_dir

from ..data.shapes import SHAPES


def register(sub):
    """Add the ``data`` subcommand with its ``synth`` and ``check`` actions."""
    p = sub.add_parser("data", help="make the synthetic dataset, check a dataset",
                       description="Dataset tools: `synth` writes the synthetic shapes dataset, "
                                   "`check` verifies a data.yaml's images and labels.")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = acts.add_parser("synth", help="write the synthetic YOLO-format shapes dataset",
                        description=f"Write a YOLO-format dataset of shapes ({', '.join(SHAPES)}) "
                                    "on cluttered backgrounds: images/, labels/ and data.yaml.")
    s.add_argument("--out", default=None, help="output folder (default: runs/data/synth, synth2, ...)")
    s.add_argument("--name", default="synth", help=argparse.SUPPRESS)
    s.add_argument("--train", type=int, default=800, help="number of train images (default: 800)")
    s.add_argument("--val", type=int, default=200, help="number of val images (default: 200)")
    s.add_argument("--imgsz", "--img", type=int, default=320, help="image size (pixels, square; default: 320)")
    s.add_argument("--classes", type=int, default=4, help=f"number of classes, 1..{len(SHAPES)} (default: 4)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files; default: 0)")
    s.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image file format (default: jpg)")
    s.set_defaults(func=run_synth)
    c = acts.add_parser("check", help="verify a data.yaml's images and labels and print a summary",
                        description="Verify every image and label of a data.yaml (writing the label cache) "
                                    "and print per-split summaries and boxes per class.")
    c.add_argument("--data", required=True, help="data.yaml")
    c.set_defaults(func=run_check)


def run_synth(args):
    """Write the synthetic dataset and say where."""
    from ..data.synth import make_synthetic_dataset

    out = Path(args.out) if args.out else new_run_dir("data", args.name)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    check_writable(out)
    t0 = time.time()
    path = make_synthetic_dataset(out, n_train=args.train, n_val=args.val, imgsz=args.imgsz,
                                  classes=args.classes, seed=args.seed, fmt=args.format)
    print(f"wrote {path} ({args.train} train + {args.val} val images, {args.imgsz}x{args.imgsz}, "
          f"{args.classes} classes: {', '.join(SHAPES[:args.classes])}) in {time.time() - t0:.1f}s")
    return 0


def run_check(args):
    """Load both splits of a data.yaml, print their summaries and a boxes-per-class table."""
    import numpy as np

    from ..data.dataset import YoloDataset, load_data_yaml
    from ..tables import format_table

    data = load_data_yaml(args.data)
    splits = [k for k in ("train", "val", "test") if k in data]
    counts = {}
    for k in splits:
        ds = YoloDataset(data[k], 640, augment=False, nc=data["nc"], prefix=f"{k}: ")
        cls = np.concatenate([lb[:, 0] for lb in ds.labels]).astype(int) if ds.labels else np.zeros(0, int)
        counts[k] = np.bincount(cls, minlength=data["nc"])
    rows = [[i, n, *(int(counts[k][i]) for k in splits)] for i, n in enumerate(data["names"])]
    print(format_table(["class", "name", *splits], rows))
    return 0
