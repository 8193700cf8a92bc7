"""Per-group keep counts that meet a FLOPs budget: uniform channel ratio, or global importance ranking."""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .plan import round_keep_array

NORMALIZERS = ("mean", "max", "sum", None)


def keep_counts_for_ratio(cg, keep_ratio: float, imgsz=640, scores: dict | None = None,
                          mode: str = "uniform", round_to: int = 8, normalize: str | None = "mean") -> dict:
    """Keep counts ``{group name: int}`` for every prunable group so that FLOPs <= ``keep_ratio`` x original.

    ``keep_ratio`` is the share of the whole model's FLOPs (thop convention, at ``imgsz``) to KEEP.
    Every count is rounded to the nearest multiple of ``round_to`` (see
    :func:`~compress.prune.plan.round_keep`) before the budget is checked, so the result meets it.

    - ``mode="uniform"``: the same channel keep ratio ``p`` in every group, the largest ``p`` that fits.
    - ``mode="global"``: all channels of all prunable groups ranked by ``scores`` normalised per group
      (``normalize``: divide by the group's ``mean``/``max``/``sum``, or ``None`` for raw scores);
      the fewest least-important channels are removed that meet the budget after rounding.

    Raises UserError when ``keep_ratio`` is not in (0, 1] or the budget cannot be met even with every
    group at its minimum.
    """
    if not 0 < keep_ratio <= 1:
        raise UserError(f"FLOPs keep ratio must be in (0, 1], got {keep_ratio}")
    if round_to < 1:
        raise UserError(f"--round-to must be a positive integer, got {round_to}")
    groups = cg.prunable
    if not groups:
        raise UserError("no prunable channel group left (everything is excluded)")
    cm = cg.cost_model(imgsz)
    pos = np.array([g.index for g in groups])
    sizes = np.array([g.size for g in groups])
    base = cm.full.copy()
    budget = keep_ratio * cm.macs(base)

    def macs(counts):
        x = base.copy()
        x[pos] = counts
        return cm.macs(x)

    floor = round_keep_array(np.zeros(len(sizes)), sizes, round_to)
    if macs(floor) > budget * (1 + 1e-12):
        raise UserError(f"cannot remove that much: with every prunable group at its minimum the model keeps "
                        f"{macs(floor) / cm.macs(base):.1%} of its FLOPs (asked to keep {keep_ratio:.1%})")
    if mode == "uniform":
        counts = _uniform(sizes, round_to, macs, budget)
    elif mode == "global":
        if scores is None:
            raise UserError("global keep counts need importance scores")
        counts = _global(groups, sizes, scores, normalize, round_to, macs, budget)
    else:
        raise UserError(f"unknown mode '{mode}' (uniform or global)")
    return {g.name: int(c) for g, c in zip(groups, counts)}


def _uniform(sizes, round_to, macs, budget):
    lo, hi = 0.0, 1.0
    if macs(sizes) <= budget:
        return sizes
    for _ in range(50):
        mid = (lo + hi) / 2
        if macs(round_keep_array(sizes * mid, sizes, round_to)) <= budget:
            lo = mid
        else:
            hi = mid
    return round_keep_array(sizes * lo, sizes, round_to)


def _global(groups, sizes, scores, normalize, round_to, macs, budget):
    if normalize not in NORMALIZERS:
        raise UserError(f"unknown score normalisation '{normalize}' (mean, max, sum or None)")
    vals, owner = [], []
    for k, g in enumerate(groups):
        if g.name not in scores:
            raise UserError(f"no importance scores for group {g.name}")
        s = np.asarray(scores[g.name], dtype=np.float64).reshape(-1)
        if s.size != g.size:
            raise ValueError(f"scores of {g.name} have {s.size} entries, the group has {g.size}")
        if normalize is not None:
            d = {"mean": s.mean(), "max": s.max(), "sum": s.sum()}[normalize]
            s = s / d if d > 0 else s
        vals.append(s)
        owner.append(np.full(g.size, k))
    order = np.argsort(np.concatenate(vals), kind="stable")
    owner = np.concatenate(owner)[order]

    def counts(m):  # remove the m least important channels, then round
        removed = np.bincount(owner[:m], minlength=len(sizes))
        return round_keep_array(sizes - removed, sizes, round_to)

    lo, hi = 0, len(order)  # counts(hi) meets the budget (checked by the caller); find the smallest m
    while lo < hi:
        mid = (lo + hi) // 2
        if macs(counts(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return counts(lo)
