"""EagleEye's strategy sampler (Li et al., ECCV 2020): random layer-wise pruning under a FLOPs budget.

The pruning core's part of EagleEye, beside the cost model it uses: many random per-group keep ratios
are drawn, each strategy placed inside the FLOPs window ``remain_ratio +- delta`` (a share of the
original model's FLOPs) with the cost model alone, so no model is built to choose a strategy.
:class:`FlopsWindowSampler` makes strategy ``i`` depend only on ``(seed, i)``. The search itself
(adaptive-BN scoring, resume, torchrun sharding, outputs) is the ``eagleeye`` stage
(:mod:`compress.stages.eagleeye`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .plan import round_keep_array


def check_window(remain_ratio: float, delta: float, min_remain: float, max_remain: float, round_to: int) -> None:
    """Raise UserError (naming the flag) for a FLOPs window or ratio range that makes no sense."""
    if not 0 < remain_ratio <= 1:
        raise UserError(f"--remain-ratio {remain_ratio}: must be in (0, 1] (the share of FLOPs to keep)")
    if not delta > 0:
        raise UserError(f"--delta {delta}: must be > 0 (half-width of the FLOPs window)")
    for flag, v in (("--min-remain", min_remain), ("--max-remain", max_remain)):
        if not 0 < v <= 1:
            raise UserError(f"{flag} {v}: must be in (0, 1] (a per-group channel keep ratio)")
    if min_remain > max_remain:
        raise UserError(f"--min-remain {min_remain} is larger than --max-remain {max_remain}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise UserError(f"--round-to {round_to}: must be a positive integer")


@dataclass
class Strategy:
    """One sampled pruning strategy: kept channels per prunable group and what they cost."""

    index: int
    counts: dict          # {group name: kept channels}
    flops_ratio: float    # FLOPs / original FLOPs (whole model, thop convention)
    gflops: float
    params: int
    in_window: bool


class FlopsWindowSampler:
    """Random per-group keep ratios brought into a FLOPs window with the cost model (no model build).

    Strategy ``i`` draws ratios ``U(min_remain, max_remain)`` per prunable group from
    ``numpy.random.default_rng([seed, i])``. A common factor ``s`` is bisected so that the counts
    ``round(clip(s * ratio, min, max) * size)`` give FLOPs nearest ``remain_ratio``; when a rounding
    step jumps over the whole window, single groups are stepped up or down by ``round_to`` channels
    (then pairs of groups) until it lands inside. Per-group counts stay multiples of ``round_to`` (or the
    whole group) within ``[ceil(min * size), floor(max * size)]`` rounded to ``round_to``.
    """

    def __init__(self, cg, imgsz, remain_ratio: float, delta: float = 0.02, min_remain: float = 0.2,
                 max_remain: float = 1.0, round_to: int = 8):
        check_window(remain_ratio, delta, min_remain, max_remain, round_to)
        groups = cg.prunable
        if not groups:
            raise UserError("no prunable channel group left (everything is excluded)")
        self.cg, self.names = cg, [g.name for g in groups]
        self.remain_ratio, self.delta = remain_ratio, delta
        self.min_remain, self.max_remain, self.round_to = min_remain, max_remain, round_to
        self.pos = np.array([g.index for g in groups])
        self.sizes = sizes = np.array([g.size for g in groups], dtype=np.int64)
        self.cm = cg.cost_model(imgsz)
        self.base_macs = self.cm.macs()
        self.target = remain_ratio * self.base_macs
        self.lo_t, self.hi_t = (remain_ratio - delta) * self.base_macs, (remain_ratio + delta) * self.base_macs
        rt = round_to
        lo = np.ceil(min_remain * sizes / rt - 1e-9).astype(np.int64) * rt
        self.lo = np.clip(lo, np.minimum(rt, sizes), sizes)
        if max_remain >= 1:
            self.hi = sizes.copy()
        else:
            hi = np.floor(max_remain * sizes / rt + 1e-9).astype(np.int64) * rt
            self.hi = np.clip(hi, self.lo, sizes)
        f_min, f_max = self.macs(self.lo), self.macs(self.hi)
        window = f"--remain-ratio {remain_ratio} +- --delta {delta}"
        if f_min > self.hi_t:
            raise UserError(f"{window} is out of reach: with every group at --min-remain {min_remain} the model "
                            f"still keeps {f_min / self.base_macs:.1%} of its FLOPs")
        if f_max < self.lo_t:
            raise UserError(f"{window} is out of reach: with every group at --max-remain {max_remain} the model "
                            f"keeps only {f_max / self.base_macs:.1%} of its FLOPs")

    # ------------------------------------------------------------------------------------ costs
    def full_vector(self, counts) -> np.ndarray:
        """Counts of the prunable groups (array, like ``names``) as the cost model's vector over all groups."""
        x = self.cm.full.copy()
        x[self.pos] = counts
        return x

    def macs(self, counts) -> float:
        """MACs of the model with these prunable-group counts."""
        return self.cm.macs(self.full_vector(counts))

    def macs_many(self, counts) -> np.ndarray:
        """MACs of many count arrays at once (rows of a (B, groups) array): :meth:`CostModel.macs`, batched."""
        X = np.repeat(self.cm.full[None], len(counts), 0)
        X[:, self.pos] = counts
        return self.cm.macs_batch(X)

    # ------------------------------------------------------------------------------------ sampling
    def ratios(self, seed: int, index: int) -> np.ndarray:
        """The raw per-group keep ratios of strategy ``index`` (before the FLOPs window)."""
        rng = np.random.default_rng([int(seed), int(index)])
        return rng.uniform(self.min_remain, self.max_remain, len(self.names))

    def _counts(self, s, r):
        raw = np.clip(s * r, self.min_remain, self.max_remain) * self.sizes
        return np.clip(round_keep_array(raw, self.sizes, self.round_to), self.lo, self.hi)

    def in_window(self, macs: float) -> bool:
        """Whether ``macs`` lies inside the FLOPs window."""
        return self.lo_t * (1 - 1e-12) <= macs <= self.hi_t * (1 + 1e-12)

    def sample(self, seed: int, index: int) -> Strategy:
        """Strategy ``index`` for ``seed``: sampled, scaled into the FLOPs window, rounded, nudged."""
        r = self.ratios(seed, index)
        counts = self.place(r)
        m = self.macs(counts)
        x = self.full_vector(counts)
        return Strategy(int(index), {n: int(c) for n, c in zip(self.names, counts)}, m / self.base_macs,
                        self.cm.gflops(x), self.cm.params(x), self.in_window(m))

    def place(self, r: np.ndarray) -> np.ndarray:
        """Counts for raw ratios ``r`` inside the FLOPs window (the closest found when none is)."""
        s_lo, s_hi = 0.0, self.max_remain / float(r.min())
        if self.macs(self._counts(s_hi, r)) < self.target:
            return self._nudge(self._counts(s_hi, r))
        if self.macs(self._counts(s_lo, r)) >= self.target:
            return self._nudge(self._counts(s_lo, r))
        for _ in range(40):  # invariant: f(s_lo) < target <= f(s_hi); f is a monotone step function of s
            mid = (s_lo + s_hi) / 2
            if self.macs(self._counts(mid, r)) < self.target:
                s_lo = mid
            else:
                s_hi = mid
        a, b = self._counts(s_lo, r), self._counts(s_hi, r)
        fa, fb = self.macs(a), self.macs(b)
        best = min(((abs(f - self.target), c) for f, c in ((fa, a), (fb, b)) if self.in_window(f)),
                   key=lambda t: t[0], default=None)
        return best[1] if best is not None else self._nudge(a)

    def _steps(self, c):
        rt, sizes = self.round_to, self.sizes
        up = (c // rt + 1) * rt
        up = np.minimum(np.where(up >= sizes, sizes, up), self.hi)
        up = np.where(c < self.hi, up, c)
        down = np.where(c % rt != 0, (c // rt) * rt, c - rt)
        down = np.where(c > self.lo, np.maximum(down, self.lo), c)
        return up, down

    def _dist(self, f):
        return np.maximum(np.maximum(self.lo_t - f, f - self.hi_t), 0)

    def _nudge(self, c):
        """Step single groups (then pairs) by one rounding step until the FLOPs are inside the window."""
        c = c.copy()
        G = len(c)
        for _ in range(4 * G):
            f = self.macs(c)
            if self.in_window(f):
                return c
            up, down = self._steps(c)
            moves = np.repeat(c[None], 2 * G, 0)
            moves[np.arange(G), np.arange(G)] = up
            moves[G + np.arange(G), np.arange(G)] = down
            fm = self.macs_many(moves)
            ok = np.nonzero([self.in_window(v) for v in fm])[0]
            if len(ok):
                return moves[ok[np.argmin(np.abs(fm[ok] - self.target))]]
            d = self._dist(fm)
            j = int(np.argmin(d))
            if d[j] >= self._dist(f):
                break
            c = moves[j]
        # one group up and another down: finer FLOPs changes than any single step
        up, down = self._steps(c)
        i, j = np.nonzero(~np.eye(G, dtype=bool))
        moves = np.repeat(c[None], len(i), 0)
        moves[np.arange(len(i)), i] = up[i]
        moves[np.arange(len(i)), j] = down[j]
        fm = self.macs_many(moves)
        ok = np.nonzero([self.in_window(v) for v in fm])[0]
        if len(ok):
            return moves[ok[np.argmin(np.abs(fm[ok] - self.target))]]
        return c


def strategy_stats(sampler: FlopsWindowSampler, seed: int, n: int) -> dict:
    """Share of ``n`` strategies inside the window and microseconds per strategy (for tests/benchmarks)."""
    t = time.perf_counter()
    strategies = [sampler.sample(seed, i) for i in range(n)]
    us = (time.perf_counter() - t) / max(n, 1) * 1e6
    ratios = np.array([s.flops_ratio for s in strategies])
    return {"n": n, "in_window": int(sum(s.in_window for s in strategies)),
            "share": float(np.mean([s.in_window for s in strategies])), "us_per_strategy": us,
            "min_ratio": float(ratios.min()), "max_ratio": float(ratios.max()),
            "mean_ratio": float(ratios.mean())}
