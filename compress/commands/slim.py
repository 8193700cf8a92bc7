"""``compress slim``: Network Slimming, one global BN-|gamma| threshold over all prunable channels."""
from __future__ import annotations

from ..options import RATIO_CONVENTIONS
from .common import add_stage_command


def register(sub):
    """Add the ``slim`` subcommand."""
    add_stage_command(
        sub, "slim", "Network Slimming: cut channels by one global BatchNorm |gamma| threshold",
        "Remove the channels with the smallest BatchNorm |gamma| (one global threshold over all prunable "
        "groups; a coupled group is scored by the mean |gamma| of its BNs) so that --global-percent of the "
        "prunable channels go, round every group to a multiple of --round-to, recalibrate BN statistics and "
        "evaluate. Train the weights with `compress train --sparsity S` first; fine-tune the result with "
        "`compress train --weights`. " + RATIO_CONVENTIONS)
