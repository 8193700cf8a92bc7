"""``compress prune``: one-shot structured pruning to a FLOPs budget (L1 or BN-gamma importance)."""
from __future__ import annotations

from ..options import RATIO_CONVENTIONS
from .common import add_stage_command


def register(sub):
    """Add the ``prune`` subcommand."""
    add_stage_command(
        sub, "prune", "structured channel pruning to a FLOPs budget (one shot)",
        "Remove whole channels (coupled groups: residual adds, concats, SPPF, Detect inputs) until the model's "
        "FLOPs shrink by --ratio; every pruned group keeps a multiple of --round-to channels. Writes model.yaml "
        "+ weights.pt + report.json + channels.png. " + RATIO_CONVENTIONS)
