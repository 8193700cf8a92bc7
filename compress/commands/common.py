"""Flags and helpers shared by several subcommands (ultralytics names where they mean the same)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..fileio import new_run_dir


def add_model_args(p, cfg=True, weights=True, imgsz=640):
    """--cfg / --weights / --imgsz as in ultralytics YOLOv5."""
    if cfg:
        p.add_argument("--cfg", default=None, help="model YAML (a path or a shipped name, e.g. yolov5s)")
    if weights:
        p.add_argument("--weights", default=None,
                       help="artifact directory, an artifact's weights.pt, or an ultralytics YOLOv5 .pt")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=imgsz, help="image size (pixels)")


def add_out_arg(p):
    """--out DIR and --name (the default is runs/<command>/<name>, a new name per run)."""
    p.add_argument("--out", default=None, help="output directory (default runs/<command>/exp, exp2, ...)")
    p.add_argument("--name", default="exp", help=argparse.SUPPRESS)


def out_dir(args, command: str) -> Path:
    """The output directory for this run: --out if given, else a fresh runs/<command>/<name>."""
    return Path(args.out) if args.out else new_run_dir(command, getattr(args, "name", "exp"))
