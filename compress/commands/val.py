"""``compress val``: P, R, mAP@0.5 and mAP@0.5:0.95 on a dataset split."""
from __future__ import annotations

from .common import add_stage_command


def register(sub):
    """Add the ``val`` subcommand."""
    add_stage_command(
        sub, "val", "validate a detector: P, R, mAP@0.5, mAP@0.5:0.95 per class",
        "Run the model on a split of --data (letterboxed to --imgsz), apply NMS (--conf, --iou, --max-det) and "
        "print P, R, mAP@0.5 and mAP@0.5:0.95 per class; writes report.json (and COCO JSON with --save-json).")
