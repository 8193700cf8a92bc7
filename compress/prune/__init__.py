"""Structured channel pruning: groups, plans, FLOPs from channel counts, importance, budgets.

Typical use::

    cg = channel_groups(model).exclude(["0"])            # once per architecture
    scores = l1_scores(cg, model.state_dict())
    counts = keep_counts_for_ratio(cg, 0.5, 640, scores, mode="global")
    plan = plan_from_counts(cg, counts, scores)
    pruned = apply_plan_to_model(model, plan, cg)        # or apply_plan(cg, sd, plan) -> (cfg, sd)
"""
from .budget import keep_counts_for_ratio
from .flops import CostModel
from .groups import ChannelGroups, Consumer, Group, channel_groups, resolve_excludes
from .importance import bn_scores, group_scores, l1_scores
from .plan import (
    apply_plan, apply_plan_to_model, build_pruned, mask_dropped_channels_, plan_counts, plan_from_counts,
    round_keep, round_keep_array, validate_plan,
)

__all__ = [
    "ChannelGroups", "Consumer", "CostModel", "Group", "apply_plan", "apply_plan_to_model", "bn_scores",
    "build_pruned", "channel_groups", "group_scores", "keep_counts_for_ratio", "l1_scores",
    "mask_dropped_channels_", "plan_counts", "plan_from_counts", "resolve_excludes", "round_keep",
    "round_keep_array", "validate_plan",
]
