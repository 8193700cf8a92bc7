"""EagleEye's strategy sampler (Li et al., ECCV 2020): random layer-wise pruning under a FLOPs budget.

The pruning core's part of EagleEye, beside the cost model it uses: random per-group keep ratios are
drawn and each strategy is put inside the FLOPs window ``remain_ratio +- delta`` (a share of the original
model's FLOPs) with the cost model alone, so no model is built to choose a strategy. Two ways, one class
(:class:`FlopsWindowSampler`), both making strategy ``i`` depend only on ``(seed, i)``:

- ``uniform`` (default, the paper's): draw every group's ratio from ``U(min_remain, max_remain)`` and keep
  the first draw whose FLOPs fall in the window (draws are batched through the cost model, microseconds
  each), so strategies follow the paper's distribution conditioned on the window;
- ``scaled``: one draw, all ratios scaled by a common bisected factor and clipped, then single groups
  nudged into the window. Never rejects, but the clipping piles groups up at full width.

The search itself (adaptive-BN scoring, resume, torchrun sharding, outputs) is the ``eagleeye`` stage
(:mod:`compress.stages.eagleeye`).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .plan import round_keep_array

SAMPLERS = ("uniform", "scaled")
# Draws per candidate (uniform), ~3 s of cost model at yolov5 size when all miss. Uniform draws concentrate
# their FLOPs far below 0.6 for wide models: yolov5s at --remain-ratio 0.6 +- 0.02 with U(0.2, 1) hits the
# window about 6 times in 100k draws (yolov5m 3 in 1M), so the bound is generous.
MAX_DRAWS = 1_000_000
# The up-front check wants this many window hits within MAX_DRAWS draws: a candidate then runs out of
# draws with probability about exp(-PROBE_HITS).
PROBE_HITS = 10
PROBE_SEED = 0x5EED
CHUNKS = (64, 256, 1024, 4096, 16384)  # rows per vectorised batch of draws, growing while nothing fits


def check_window(remain_ratio: float, delta: float, min_remain: float, max_remain: float, round_to: int,
                 sampler: str = "uniform") -> None:
    """Raise UserError (naming the flag) for a FLOPs window, ratio range or sampler that makes no sense."""
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
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
    draws: int = 1        # ratio vectors drawn to get it (uniform: up to the first inside the window)


@dataclass
class DrawRun:
    """What a run of uniform draws found (see :meth:`FlopsWindowSampler.draw_until`)."""

    counts: np.ndarray | None  # the first draw inside the window (None: none was)
    first: int                 # draws up to and including that one (all drawn when none was)
    hits: int                  # draws inside the window
    drawn: int
    min_ratio: float           # smallest and largest FLOPs ratio among the draws
    max_ratio: float


class FlopsWindowSampler:
    """Random per-group keep ratios, put into a FLOPs window with the cost model (no model build).

    Strategy ``i`` draws ratios ``U(min_remain, max_remain)`` per prunable group from
    ``numpy.random.default_rng([seed, i])`` and rounds them to counts: multiples of ``round_to`` (or the
    whole group) within ``[ceil(min * size), floor(max * size)]`` rounded to ``round_to``. Then, by
    ``sampler``:

    - ``uniform``: successive draws from that generator until the first one inside the window (at most
      ``max_draws``; a UserError with the FLOPs range of the draws when none fits). On construction a probe
      checks that the window is hit often enough for that bound (:data:`PROBE_HITS`);
    - ``scaled``: the first draw only; a common factor ``s`` is bisected so that the counts
      ``round(clip(s * ratio, min, max) * size)`` give FLOPs nearest ``remain_ratio``; when a rounding step
      jumps over the whole window, single groups are stepped up or down by ``round_to`` channels (then
      pairs of groups) until it lands inside.
    """

    def __init__(self, cg, imgsz, remain_ratio: float, delta: float = 0.02, min_remain: float = 0.2,
                 max_remain: float = 1.0, round_to: int = 8, sampler: str = "uniform", max_draws: int = MAX_DRAWS):
        check_window(remain_ratio, delta, min_remain, max_remain, round_to, sampler)
        groups = cg.prunable
        if not groups:
            raise UserError("no prunable channel group left (everything is excluded)")
        self.cg, self.names = cg, [g.name for g in groups]
        self.remain_ratio, self.delta = remain_ratio, delta
        self.min_remain, self.max_remain, self.round_to = min_remain, max_remain, round_to
        self.sampler, self.max_draws = sampler, int(max_draws)
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
        if f_min > self.hi_t:
            raise UserError(f"{self.window} is out of reach: with every group at --min-remain {min_remain} the "
                            f"model still keeps {f_min / self.base_macs:.1%} of its FLOPs")
        if f_max < self.lo_t:
            raise UserError(f"{self.window} is out of reach: with every group at --max-remain {max_remain} the "
                            f"model keeps only {f_max / self.base_macs:.1%} of its FLOPs")
        if sampler == "uniform":
            self.probe = self.draw_until(np.random.default_rng(PROBE_SEED), PROBE_HITS, self.max_draws)
            if self.probe.hits < PROBE_HITS:
                raise UserError(self._unreachable(self.probe, "of uniform draws"))

    @property
    def window(self) -> str:
        """The FLOPs window in the words of the flags that set it."""
        return f"--remain-ratio {self.remain_ratio} +- --delta {self.delta}"

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

    def in_window(self, macs):
        """Whether ``macs`` (a number or an array) lies inside the FLOPs window."""
        return (self.lo_t * (1 - 1e-12) <= macs) & (macs <= self.hi_t * (1 + 1e-12))

    # ------------------------------------------------------------------------------------ sampling
    @staticmethod
    def rng(seed: int, index: int) -> np.random.Generator:
        """The generator of strategy ``index``: a function of ``(seed, index)`` alone."""
        return np.random.default_rng([int(seed), int(index)])

    def ratios(self, seed: int, index: int) -> np.ndarray:
        """The first raw per-group keep ratios of strategy ``index`` (before rounding and the FLOPs window)."""
        return self.rng(seed, index).uniform(self.min_remain, self.max_remain, len(self.names))

    def counts_of(self, r, scale: float = 1.0) -> np.ndarray:
        """Counts for keep ratios ``r`` (one vector or rows of them) times ``scale``: clipped, rounded."""
        raw = np.clip(scale * r, self.min_remain, self.max_remain) * self.sizes
        return np.clip(round_keep_array(raw, self.sizes, self.round_to), self.lo, self.hi)

    def sample(self, seed: int, index: int) -> Strategy:
        """Strategy ``index`` for ``seed``, drawn as ``sampler`` says."""
        if self.sampler == "scaled":
            counts, draws = self.place(self.ratios(seed, index)), 1
        else:
            run = self.draw_until(self.rng(seed, index), 1, self.max_draws)
            if run.counts is None:
                raise UserError(f"candidate {index}: " + self._unreachable(run, "of its draws"))
            counts, draws = run.counts, run.first
        m = self.macs(counts)
        x = self.full_vector(counts)
        return Strategy(int(index), {n: int(c) for n, c in zip(self.names, counts)}, m / self.base_macs,
                        self.cm.gflops(x), self.cm.params(x), bool(self.in_window(m)), int(draws))

    # ------------------------------------------------------------------------------------ uniform
    def draw_until(self, rng: np.random.Generator, hits: int, limit: int) -> DrawRun:
        """Draw rounded ``U(min_remain, max_remain)`` strategies from ``rng`` until ``hits`` of them lie in
        the window or ``limit`` are drawn.

        Draws are made in growing vectorised chunks; rows come off the generator in order, so what is
        found does not depend on the chunk sizes.
        """
        first, found, drawn, lo, hi = None, 0, 0, np.inf, -np.inf
        chunks = itertools.chain(CHUNKS, itertools.repeat(CHUNKS[-1]))
        while drawn < limit and found < hits:
            n = min(next(chunks), limit - drawn)
            counts = self.counts_of(rng.uniform(self.min_remain, self.max_remain, (n, len(self.names))))
            macs = self.macs_many(counts)
            ok = np.flatnonzero(self.in_window(macs))
            if first is None and len(ok):
                first = (counts[ok[0]], drawn + int(ok[0]) + 1)
            found, drawn = found + len(ok), drawn + n
            lo, hi = min(lo, float(macs.min())), max(hi, float(macs.max()))
        counts, n_first = first if first is not None else (None, drawn)
        return DrawRun(counts, n_first, found, drawn, lo / self.base_macs, hi / self.base_macs)

    def _unreachable(self, run: DrawRun, what: str) -> str:
        way = "up" if self.remain_ratio > (run.min_ratio + run.max_ratio) / 2 else "down"
        return (f"{self.window} is out of reach {what}: {run.hits} of {run.drawn} draws with keep ratios "
                f"U({self.min_remain}, {self.max_remain}) land in it (their FLOPs ratio spans "
                f"{run.min_ratio:.1%}..{run.max_ratio:.1%}); widen --delta, move --min-remain/--max-remain {way} "
                f"or use --sampler scaled")

    # ------------------------------------------------------------------------------------ scaled
    def place(self, r: np.ndarray) -> np.ndarray:
        """Counts for raw ratios ``r`` inside the FLOPs window (the closest found when none is)."""
        s_lo, s_hi = 0.0, self.max_remain / float(r.min())
        if self.macs(self.counts_of(r, s_hi)) < self.target:
            return self._nudge(self.counts_of(r, s_hi))
        if self.macs(self.counts_of(r, s_lo)) >= self.target:
            return self._nudge(self.counts_of(r, s_lo))
        for _ in range(40):  # invariant: f(s_lo) < target <= f(s_hi); f is a monotone step function of s
            mid = (s_lo + s_hi) / 2
            if self.macs(self.counts_of(r, mid)) < self.target:
                s_lo = mid
            else:
                s_hi = mid
        a, b = self.counts_of(r, s_lo), self.counts_of(r, s_hi)
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
            ok = np.flatnonzero(self.in_window(fm))
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
        ok = np.flatnonzero(self.in_window(fm))
        if len(ok):
            return moves[ok[np.argmin(np.abs(fm[ok] - self.target))]]
        return c


def full_width_share(sampler: FlopsWindowSampler, counts) -> float:
    """Share of (strategy, group) pairs kept at full width, over count dicts ``{group name: kept}``."""
    kept = np.array([[c[n] for n in sampler.names] for c in counts])
    return float((kept == sampler.sizes).mean()) if len(kept) else float("nan")


def strategy_stats(sampler: FlopsWindowSampler, seed: int, n: int) -> dict:
    """Strategies ``0..n-1`` summarised (for tests and benchmarks): the share inside the window, draws per
    strategy and the acceptance rate (strategies inside the window per draw), microseconds per strategy,
    the FLOPs ratios and the share of groups at full width."""
    t = time.perf_counter()
    strategies = [sampler.sample(seed, i) for i in range(n)]
    us = (time.perf_counter() - t) / max(n, 1) * 1e6
    ratios = np.array([s.flops_ratio for s in strategies])
    inside = sum(s.in_window for s in strategies)
    draws = sum(s.draws for s in strategies)
    return {"sampler": sampler.sampler, "n": n, "in_window": int(inside), "share": inside / max(n, 1),
            "draws_per_strategy": draws / max(n, 1), "acceptance": inside / max(draws, 1),
            "us_per_strategy": us, "min_ratio": float(ratios.min()), "max_ratio": float(ratios.max()),
            "mean_ratio": float(ratios.mean()),
            "full_width": full_width_share(sampler, [s.counts for s in strategies])}
