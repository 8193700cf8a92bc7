"""Channel importance per group: L1 norm of filters and BN |gamma|, from a state_dict."""
from __future__ import annotations

import torch

from ..errors import UserError


def l1_scores(cg, state_dict: dict) -> dict:
    """Per-channel L1 norm of the filters producing each prunable group's channels.

    For every producer conv weight (dim 0 = the group's channels, depthwise convs the channels pass
    through included) the absolute values over its other dims are summed; the group's score is the sum
    over its producer convs. Returns ``{group name: float32 tensor of size group.size}``.
    """
    out = {}
    for g in cg.prunable:
        s = torch.zeros(g.size, dtype=torch.float32)
        for key in g.producers:
            t = state_dict[key]
            if t.dim() == 4:
                s += t.detach().float().abs().flatten(1).sum(1).cpu()
        out[g.name] = s
    return out


def bn_scores(cg, state_dict: dict) -> dict:
    """Per-channel |gamma| summed over the BatchNorms of each prunable group's producers.

    Returns ``{group name: float32 tensor of size group.size}`` (Network Slimming's criterion).
    """
    out = {}
    for g in cg.prunable:
        s = torch.zeros(g.size, dtype=torch.float32)
        for key in g.bn_weights:
            s += state_dict[key].detach().float().abs().cpu()
        out[g.name] = s
    return out


METHODS = {"l1": l1_scores, "bn": bn_scores}


def group_scores(cg, state_dict: dict, method: str = "l1") -> dict:
    """Scores by criterion name (``l1`` or ``bn``); UserError for an unknown name."""
    fn = METHODS.get(method)
    if fn is None:
        raise UserError(f"--method {method}: unknown importance criterion (choose from {', '.join(METHODS)})")
    return fn(cg, state_dict)
