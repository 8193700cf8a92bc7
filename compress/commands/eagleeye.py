"""``compress eagleeye``: EagleEye sub-net search (random layer-wise pruning + adaptive BN scoring)."""
from __future__ import annotations

from ..options import RATIO_CONVENTIONS
from .common import add_stage_command


def register(sub):
    """Add the ``eagleeye`` subcommand."""
    add_stage_command(
        sub, "eagleeye", "EagleEye search: many random pruning strategies at a FLOPs budget, best one kept",
        "Sample --candidates random per-group channel keep ratios, each placed inside the FLOPs window "
        "--remain-ratio +- --delta, keep the highest-L1 filters, re-estimate BatchNorm statistics on "
        "--bn-batches training batches (adaptive BN) and score on --eval-batches validation batches. Writes "
        "the best sub-net (model.yaml + weights.pt + report.json), top/1..K, candidates.jsonl, scatter.png "
        "and channels.png; fine-tune the result with `compress train --weights OUT`. Under torchrun the "
        "candidates are shared across processes. " + RATIO_CONVENTIONS)
