"""Network Slimming (Liu et al., ICCV 2017): L1 sparsity on BatchNorm scale factors, then one global cut.

The pruning core's part: the sparsity schedule, which gammas are prunable, their statistics and the
global-threshold plan. The stages use it: :class:`compress.stages.sparsity.SparsityCallback` (training)
and :mod:`compress.stages.slim` (the cut, recalibration, evaluation, artifact).

1. **Sparsity training** (``compress train --sparsity S``): after backward, in
   the trainer's ``on_before_step`` hook (gradients already unscaled under AMP and all-reduced under
   DDP), ``s * sign(gamma)`` is added to the gradient of every *prunable* BatchNorm gamma: the BNs of
   the producers of the prunable channel groups (never the BNs whose channels cannot be pruned, such as
   ShuffleBlock outputs, nor groups given to ``--exclude``). Each epoch the share of those gammas below
   1e-2 and 1e-3 goes into results.csv and ``gamma_hist.png`` shows the |gamma| histogram.
2. **Slimming** (:func:`slim_plan`, ``compress slim``): every channel of every prunable group gets one score,
   the mean |gamma| over all the group's BNs (a residual group is one unit: its channels are kept or cut
   together in every BN of the group). One global threshold over these scores removes ``global_percent``
   of the prunable channels; each group's remaining count is then rounded to the nearest multiple of
   ``round_to`` (never fewer than ``round_to``), the highest-scoring channels are kept, the plan is
   applied with the pruning core and the BN statistics are recalibrated (adaptive BN).
3. **Fine-tuning**: ``compress train --weights SLIM_DIR`` (the slimmed artifact is an ordinary one).

Sparsity schedules (``s`` is ``--sparsity``, ``E`` the epochs, ``K`` the warmup epochs, ``e`` the
0-based epoch; the value is constant within an epoch):

- ``constant``: ``s`` for every epoch ``e >= K``;
- ``cosine-decay``: ``s * (0.01 + 0.99 * (1 + cos(pi * t)) / 2)`` with ``t = (e - K) / max(E - K - 1, 1)``,
  i.e. ``s`` in the first epoch after warmup down to ``0.01 * s`` in the last one;
- warmup: ``0`` for ``e < K`` under either schedule.

"Not trained sparse" rule: slimming warns when fewer than ``SPARSE_SHARE`` (10%) of the prunable
gammas are below ``SPARSE_BELOW`` (1e-2). A model trained without ``--sparsity`` has almost none there
(BN gammas stay near 1), so removing a large share of its channels cuts channels that carry signal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserError
from .importance import bn_scores
from .plan import plan_from_counts, round_keep

SCHEDULES = ("constant", "cosine-decay")
SPARSE_BELOW = 1e-2   # a gamma below this counts as "sparse"
SPARSE_SHARE = 0.10   # slimming warns when fewer than this share of prunable gammas are sparse
HIST_FILE = "gamma_hist.png"


# ----------------------------------------------------------------------------------------- gammas
def sparsity_at(s: float, epoch: int, epochs: int, schedule: str = "constant", warmup_epochs: int = 0) -> float:
    """The L1 factor used in 0-based ``epoch`` of ``epochs`` (see the module docstring for the formulas)."""
    if schedule not in SCHEDULES:
        raise UserError(f"--sparsity-schedule {schedule}: unknown (choose from {', '.join(SCHEDULES)})")
    if epoch < warmup_epochs:
        return 0.0
    if schedule == "constant":
        return float(s)
    t = min(max((epoch - warmup_epochs) / max(epochs - warmup_epochs - 1, 1), 0.0), 1.0)
    return float(s) * (0.01 + 0.99 * (1 + math.cos(math.pi * t)) / 2)


def prunable_bn_keys(cg) -> list:
    """State_dict keys of the BN weights (gammas) of every prunable group's producers, in model order."""
    return [k for g in cg.prunable for k in g.bn_weights]


def gamma_values(state_dict: dict, keys) -> torch.Tensor:
    """All |gamma| of the BN weights ``keys`` as one flat float32 CPU tensor."""
    if not keys:
        return torch.zeros(0)
    return torch.cat([state_dict[k].detach().float().abs().flatten().cpu() for k in keys])


def gamma_stats(gammas: torch.Tensor) -> dict:
    """``{"n", "lt_1e-2", "lt_1e-3", "median"}``: count, shares of |gamma| below 1e-2 / 1e-3, median."""
    n = int(gammas.numel())
    if not n:
        return {"n": 0, "lt_1e-2": 0.0, "lt_1e-3": 0.0, "median": 0.0}
    return {"n": n, "lt_1e-2": float((gammas < 1e-2).float().mean()), "lt_1e-3": float((gammas < 1e-3).float().mean()),
            "median": float(gammas.median())}


# ----------------------------------------------------------------------------------------- pruning
def channel_scores(cg, state_dict: dict) -> dict:
    """Per-channel slimming score of every prunable group that has BNs: mean |gamma| over its BNs.

    Returns ``{group name: float32 tensor of size group.size}``; groups without a BN are left out.
    """
    sums = bn_scores(cg, state_dict)
    out = {}
    for g in cg.prunable:
        n = len(g.bn_weights)
        if n:
            out[g.name] = sums[g.name] / n
    return out


@dataclass
class SlimPlan:
    """The result of :func:`slim_plan`.

    ``threshold``: the lowest score left above the global cut (before rounding); ``counts``: kept channels per
    prunable group (after rounding); ``plan``: kept indices (core plan format); ``held``: groups held at
    the minimum ``{name: channels the threshold alone would keep}``; ``removed``: achieved share of
    prunable channels removed (after rounding); ``below``: share under the threshold (before rounding).
    """

    threshold: float
    counts: dict
    plan: dict
    scores: dict
    held: dict
    removed: float
    below: float
    channels: int
    kept: int
    gamma: dict = field(default_factory=dict)


def _check_percent(p):
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise UserError(f"--global-percent {p}: must be in [0, 1) (the share of prunable channels to remove)")


def slim_plan(cg, state_dict: dict, global_percent: float, round_to: int = 8, source: str = "weights") -> SlimPlan:
    """Choose the channels to keep by one global |gamma| threshold (see the module docstring).

    ``global_percent`` in [0, 1) is the share of the prunable channels (a coupled group counts its
    channels once) to remove: the ``floor(p * N)`` lowest-scoring of the ``N`` prunable channels fall
    under the threshold (the score of the lowest channel left above it; channels tied with it are
    cut evenly across their groups, which only matters for barely trained weights). Each group then keeps
    ``round_keep(n)`` channels (``n``: its channels above the threshold), its highest-scoring ones.
    Raises UserError for a percent outside [0, 1), no prunable group with a BatchNorm, or gammas that
    are all equal (untrained weights: nothing to rank).
    """
    _check_percent(global_percent)
    if round_to < 1:
        raise UserError(f"--round-to {round_to}: must be a positive integer")
    scores = channel_scores(cg, state_dict)
    if not scores:
        raise UserError(f"{source}: no prunable channel group has a BatchNorm "
                        f"(nothing for Network Slimming to rank; everything excluded or unprunable)")
    gammas = gamma_values(state_dict, prunable_bn_keys(cg))
    if float(gammas.max() - gammas.min()) == 0:
        raise UserError(f"{source}: every prunable BatchNorm |gamma| is {float(gammas[0]):g}: these weights "
                        f"were never trained, there is nothing to rank (train with --sparsity first)")
    flat = torch.cat(list(scores.values()))
    n_all = flat.numel()
    n_cut = min(int(math.floor(round(global_percent * n_all, 6))), n_all - 1)
    # ties (barely trained weights) are cut evenly across groups: second key = position within the group
    frac = torch.cat([(torch.arange(len(v)) + 0.5) / len(v) for v in scores.values()])
    order = torch.from_numpy(np.lexsort((frac.numpy(), flat.double().numpy())))
    cut = torch.zeros(n_all, dtype=torch.bool)
    cut[order[:n_cut]] = True
    thr = float(flat[order[n_cut]])
    by_name = cg.by_name
    counts, held = {}, {}
    off = 0
    for name, s in scores.items():
        size = by_name[name].size
        n = size - int(cut[off:off + size].sum())
        off += size
        counts[name] = round_keep(n, size, round_to)
        if n < min(round_to, size):
            held[name] = n
    plan = plan_from_counts(cg, counts, scores)
    kept = sum(counts.values())
    return SlimPlan(threshold=thr, counts=counts, plan=plan, scores=scores, held=held, removed=1 - kept / n_all,
                    below=n_cut / n_all, channels=n_all, kept=kept, gamma=gamma_stats(gammas))


def not_sparse_warning(gamma: dict, global_percent: float) -> str | None:
    """The warning for weights that were not trained sparse (module docstring's rule), or None."""
    if gamma["lt_1e-2"] >= SPARSE_SHARE or global_percent == 0:
        return None
    return (f"the weights do not look sparsity-trained: only {gamma['lt_1e-2']:.1%} of the {gamma['n']} prunable "
            f"BN |gamma| are below {SPARSE_BELOW:g} (slimming expects >= {SPARSE_SHARE:.0%}); removing "
            f"{global_percent:.0%} of the channels will cut channels that matter (train with "
            f"`compress train --sparsity 1e-3` first, and fine-tune after slimming)")
