"""EagleEye sub-net search (Li et al., ECCV 2020): random layer-wise pruning under a FLOPs budget.

Many random per-group keep ratios are drawn; each strategy is placed inside the FLOPs window
``remain_ratio +- delta`` (a share of the original model's FLOPs) with the cost model alone, by scaling
all ratios by one bisected factor and then nudging single groups past rounding steps, so nearly every
sampled strategy is evaluated rather than rejected. Each candidate keeps, in every group, its channels
with the largest filter L1 norms (ranked once), gets its BatchNorm statistics re-estimated on the same
fixed training batches (adaptive BN) and is scored on the same fixed validation subset; the best
candidates are written as artifacts for fine-tuning.

Pieces: :class:`FlopsWindowSampler` (strategy ``i`` depends only on ``(seed, i)``),
:class:`CandidateScorer` (the per-candidate work: apply plan, build, adaptive BN, evaluate) and
:func:`search` (the ``compress eagleeye`` run: resume, sharding across torchrun ranks, outputs).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .importance import l1_scores
from .plan import build_pruned, plan_from_counts, round_keep_array

CANDIDATES, SEARCH = "candidates.jsonl", "search.json"
METRICS = ("map50", "map")
# Options that change which candidates are drawn or how they score: a resumed search must match them.
SEARCH_KEYS = ("weights", "cfg", "data", "remain_ratio", "delta", "min_remain", "max_remain", "round_to",
               "exclude", "imgsz", "seed", "bn_batches", "eval_batches", "batch")


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


# ------------------------------------------------------------------------------------------- scoring
class CandidateScorer:
    """The per-candidate work of the search, with everything shared computed once.

    Holds the base state_dict on ``device``, the L1 filter scores of every group (the channel
    ranking), the adaptive-BN batches and the validation batches (images moved to ``device`` once).
    :meth:`score` applies a strategy by index selection, builds the pruned model, re-estimates its BN
    statistics and evaluates it; the base weights are never modified.
    """

    def __init__(self, model, cg, bn_batches, val_batches, data: dict, device="cpu"):
        self.cg, self.data, self.device = cg, data, torch.device(device)
        self.names = list(getattr(model, "names", []) or data["names"])
        self.sd = {k: v.detach().to(self.device) for k, v in model.state_dict().items()}
        self.scores = l1_scores(cg, self.sd)
        self.bn_batches = [_batch_to(b, self.device) for b in bn_batches]
        self.val_batches = [_batch_to(b, self.device) for b in val_batches]

    def build(self, counts: dict):
        """The pruned model (on ``device``) keeping each group's ``counts[name]`` highest-L1 channels."""
        plan = plan_from_counts(self.cg, counts, self.scores)
        return build_pruned(self.cg, self.sd, plan, names=self.names)

    def recalibrate(self, model) -> None:
        """Adaptive BN on the fixed training batches (running statistics only; weights unchanged)."""
        from ..engine.validate import adaptive_bn

        adaptive_bn(model, self.bn_batches, self.device)

    def evaluate(self, model) -> dict:
        """Metrics on the fixed validation subset (NMS + COCO-equivalent mAP)."""
        from ..engine.validate import evaluate_model

        return evaluate_model(model, self.val_batches, self.data, self.device)

    def score(self, counts: dict):
        """Build, recalibrate and evaluate one candidate; returns ``(model, metrics)``."""
        model = self.build(counts)
        self.recalibrate(model)
        return model, self.evaluate(model)


def _batch_to(b, device):
    imgs, *rest = b
    return (imgs.to(device), *rest)


# ------------------------------------------------------------------------------------------- search
@dataclass
class EagleEyeOptions:
    """What ``compress eagleeye`` takes; every field has the CLI flag of the same name."""

    data: str = ""
    weights: str | None = None
    cfg: str | None = None
    remain_ratio: float = 0.6
    candidates: int = 200
    delta: float = 0.02
    min_remain: float = 0.2
    max_remain: float = 1.0
    bn_batches: int = 20
    eval_batches: int = 10
    batch: int = 32
    metric: str = "map50"
    top_k: int = 5
    seed: int = 0
    round_to: int = 8
    exclude: list = field(default_factory=list)
    imgsz: int = 320
    out: str = "runs/eagleeye/exp"
    resume: bool = False
    workers: int = 0
    device: str = "cpu"
    progress: bool = True


def validate_options(o: EagleEyeOptions) -> None:
    """Raise UserError for any option out of range (before anything is loaded)."""
    check_window(o.remain_ratio, o.delta, o.min_remain, o.max_remain, o.round_to)
    for flag, v in (("--candidates", o.candidates), ("--bn-batches", o.bn_batches),
                    ("--eval-batches", o.eval_batches), ("--batch", o.batch), ("--top-k", o.top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{flag} {v}: must be a positive integer")
    if o.metric not in METRICS:
        raise UserError(f"--metric {o.metric}: choose map50 or map")
    if not o.data:
        raise UserError("--data DATA.yaml is required")
    if not o.weights and not o.cfg:
        raise UserError("give --weights (artifact dir or .pt) and/or --cfg MODEL.yaml")


def rank_key(rec: dict, metric: str):
    """Sort key of an evaluated candidate: the chosen metric, then the other one, then the lower index."""
    other = "map" if metric == "map50" else "map50"
    return (rec[metric], rec[other], -rec["index"])


def read_candidates(path) -> list:
    """The records of a candidates.jsonl (a torn last line from a crash is dropped)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    lines = p.read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise UserError(f"{p}: line {n + 1} is not valid JSON") from None
    return out


def _search_fingerprint(o: EagleEyeOptions) -> dict:
    d = {k: getattr(o, k) for k in SEARCH_KEYS}
    for k in ("weights", "cfg", "data"):
        if d[k] is not None and Path(str(d[k])).exists():
            d[k] = str(Path(d[k]).resolve())
    d["exclude"] = list(d["exclude"])
    return d


def _prior_records(o: EagleEyeOptions, out: Path, sampler) -> list:
    """Records of an earlier run to resume from (validated against this run's options)."""
    if not o.resume:
        return []
    saved_f = out / SEARCH
    if not saved_f.is_file():
        return []
    saved = json.loads(saved_f.read_text())
    now = _search_fingerprint(o)
    for k in SEARCH_KEYS:
        if saved.get(k) != now[k]:
            flag = "--" + k.replace("_", "-")
            raise UserError(f"--resume: {out} was searched with {flag} {saved.get(k)!r}, not {now[k]!r}; "
                            f"resume with the same options or use another --out")
    recs = {}
    for r in read_candidates(out / CANDIDATES):
        if r.get("seed") != o.seed or set(r.get("counts", {})) != set(sampler.names):
            raise UserError(f"{out / CANDIDATES}: candidate {r.get('index')} does not belong to this search")
        recs[int(r["index"])] = r
    return [recs[i] for i in sorted(recs)]


def _dist_setup(device):
    """(rank, world size, device, whether this call initialised the process group)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    created = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            created = True
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    return rank, world, device, created


def load_search_model(o: EagleEyeOptions):
    """Load what a search starts from: ``(model, data, channel groups, sampler)``.

    The model comes from ``--weights`` (or ``--cfg`` with seeded random weights), in eval mode with the
    dataset's class names; the groups honour ``--exclude``; the sampler raises UserError when the FLOPs
    window is out of reach.
    """
    from ..data.dataset import load_data_yaml
    from ..model.artifact import load_model
    from ..model.profile import check_imgsz
    from .groups import channel_groups

    validate_options(o)
    data = load_data_yaml(o.data)
    if o.weights:
        model = load_model(o.cfg, o.weights)
    else:
        torch.manual_seed(o.seed)
        model = load_model(o.cfg, nc=data["nc"])
    if model.nc != data["nc"]:
        raise UserError(f"{o.data}: nc={data['nc']} but the model predicts {model.nc} classes")
    model.names = list(data["names"])
    model.eval()
    check_imgsz(model, o.imgsz)
    cg = channel_groups(model).exclude(o.exclude)
    sampler = FlopsWindowSampler(cg, o.imgsz, o.remain_ratio, o.delta, o.min_remain, o.max_remain, o.round_to)
    return model, data, cg, sampler


def make_scorer(o: EagleEyeOptions, model, cg, data: dict, device="cpu") -> CandidateScorer:
    """The :class:`CandidateScorer` of a search: ``--bn-batches`` shuffled train batches and ``--eval-batches``
    shuffled val batches (seeded by ``--seed``, unaugmented, loaded once)."""
    from ..engine.validate import load_batches

    bn = load_batches(data["train"], o.imgsz, o.batch, o.bn_batches, data["nc"], seed=o.seed, shuffle=True,
                      workers=o.workers, prefix="adaptive BN: ")
    val = load_batches(data["val"], o.imgsz, o.batch, o.eval_batches, data["nc"], seed=o.seed, shuffle=True,
                       workers=o.workers, prefix="eval: ")
    return CandidateScorer(model, cg, bn, val, data, device)


def search(o: EagleEyeOptions) -> dict:
    """Run an EagleEye search; returns the report of the best sub-net (on rank 0; ``{}`` on other ranks).

    Writes into ``o.out``: ``candidates.jsonl`` (one line per candidate, flushed as it goes),
    ``search.json`` (the options that define the search, checked by ``resume``), the best sub-net as an
    artifact (BN-recalibrated weights), the ``top_k`` best as artifacts in ``top/1``, ``top/2`` ...,
    ``scatter.png`` (FLOPs ratio vs score) and ``channels.png`` (kept channels of the best).
    Under torchrun, candidate ``i`` is scored on rank ``i % world_size`` and rank 0 writes everything.
    """
    from ..engine.trainer import select_device

    model, data, cg, sampler = load_search_model(o)
    device = select_device(o.device)
    out = Path(o.out)
    prior = _prior_records(o, out, sampler)  # every rank reads it (nobody writes before the barrier)

    rank, world, device, created = _dist_setup(device)
    try:
        scorer = make_scorer(o, model, cg, data, device)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            _start_files(o, out, prior)
        records, local_top, wall, n_new = _run_candidates(o, sampler, scorer, prior, rank, world)
        top = _gather_top(o, scorer, records, local_top, rank, world)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return {}
    return _write_outputs(o, out, model, cg, sampler, scorer, records, top, wall, n_new, world)


def _start_files(o, out: Path, prior: list) -> None:
    from ..fileio import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    if o.resume and prior:
        print(f"resuming {out}: {len(prior)} candidate(s) done")
    elif o.resume:
        print(f"resuming {out}: nothing done yet, starting the search")
    # rewrite the kept records (drops a torn last line) and record what defines this search
    write_text(out / CANDIDATES, "".join(json.dumps(r) + "\n" for r in prior))
    write_json(out / SEARCH, _search_fingerprint(o))


def _run_candidates(o, sampler, scorer, prior, rank, world):
    """Score this rank's share of the pending candidates; rank 0 appends every record to candidates.jsonl.

    Returns (all records on rank 0 / this rank's records elsewhere, this rank's top-k models as
    ``{index: model}``, wall seconds of the loop, number of candidates processed by all ranks).
    """
    from tqdm import tqdm

    done = {r["index"] for r in prior}
    pending = [i for i in range(o.candidates) if i not in done]
    mine = [i for i in pending if i % world == rank]
    rounds = max((sum(1 for i in pending if i % world == k) for k in range(world)), default=0)
    records = list(prior)
    ok = [r for r in records if r["status"] == "ok" and r["index"] < o.candidates]
    best = max(ok, key=lambda r: rank_key(r, o.metric)) if ok else None
    local_top = []  # (key, index, model): this rank's best k, kept without copies
    f = open(Path(o.out) / CANDIDATES, "a") if rank == 0 else None
    bar = tqdm(total=len(pending), unit="cand", desc="eagleeye", dynamic_ncols=True,
               disable=not (rank == 0 and o.progress))
    t0 = time.perf_counter()
    try:
        for step in range(rounds):
            rec = None
            if step < len(mine):
                rec, model = _one_candidate(o, sampler, scorer, mine[step], rank)
                if model is not None:
                    local_top.append((rank_key(rec, o.metric), rec["index"], model))
                    local_top.sort(key=lambda t: t[0], reverse=True)
                    del local_top[o.top_k:]
            got = _gather([rec], rank, world)
            if rank == 0:
                new = sorted((r for r in got if r is not None), key=lambda r: r["index"])
                for r in new:
                    f.write(json.dumps(r) + "\n")
                    if r["status"] == "ok" and (best is None or rank_key(r, o.metric) > rank_key(best, o.metric)):
                        best = r
                f.flush()
                records += new
                bar.update(len(new))
                if best is not None:
                    bar.set_postfix(best=f"{best[o.metric]:.4f}", cand=best["index"])
            elif rec is not None:
                records.append(rec)
    finally:
        bar.close()
        if f is not None:
            f.close()
    return records, {i: m for _, i, m in local_top}, time.perf_counter() - t0, len(pending)


def _one_candidate(o, sampler, scorer, index, rank):
    t = time.perf_counter()
    st = sampler.sample(o.seed, index)
    rec = {"index": index, "seed": o.seed, "status": "ok" if st.in_window else "rejected",
           "counts": st.counts, "flops_ratio": st.flops_ratio, "gflops": st.gflops, "params": st.params}
    model = None
    if st.in_window:
        model, res = scorer.score(st.counts)
        rec.update(map50=res["map50"], map=res["map"], precision=res["precision"], recall=res["recall"],
                   score=res[o.metric])
    rec.update(seconds=round(time.perf_counter() - t, 4), rank=rank)
    return rec, model


def _gather(objs, rank, world):
    if world == 1:
        return list(objs)
    import torch.distributed as dist

    got = [None] * world if rank == 0 else None
    dist.gather_object(objs, got, dst=0)
    return [x for part in got for x in part] if rank == 0 else []


def _gather_top(o, scorer, records, local_top, rank, world):
    """On rank 0: ``[(record, model)]`` of the global top-k, best first (recomputed when resumed)."""
    top_idx = None
    if rank == 0:
        ok = [r for r in records if r["status"] == "ok" and r["index"] < o.candidates]
        if not ok:
            top_idx = []
        else:
            top_idx = [r["index"] for r in sorted(ok, key=lambda r: rank_key(r, o.metric), reverse=True)[:o.top_k]]
    if world > 1:
        import torch.distributed as dist

        box = [top_idx]
        dist.broadcast_object_list(box, src=0)
        top_idx = box[0]
        payload = [(i, dict(m.yaml), {k: v.detach().cpu() for k, v in m.state_dict().items()})
                   for i, m in local_top.items() if i in top_idx]
        got = _gather(payload, rank, world)
        if rank != 0:
            return []
        from ..model.yolo import Model

        models = {}
        for i, cfg, sd in got:
            m = Model(cfg, names=scorer.names)
            m.load_state_dict(sd)
            models[i] = m.eval()
    else:
        models = {i: m for i, m in local_top.items() if i in top_idx}
    if not top_idx:
        raise UserError("no candidate landed inside the FLOPs window; widen --delta or the --min/--max-remain range")
    by_index = {r["index"]: r for r in records}
    top = []
    for i in top_idx:
        rec = by_index[i]
        if i not in models:  # scored in an earlier (resumed) run: rebuild and recalibrate it
            models[i], res = scorer.score(rec["counts"])
            if abs(res[o.metric] - rec[o.metric]) > 1e-6:
                print(f"warning: candidate {i} re-scored {res[o.metric]:.5f}, recorded {rec[o.metric]:.5f}")
        top.append((rec, models[i]))
    return top


def _write_outputs(o, out, model, cg, sampler, scorer, records, top, wall, n_new, world):
    from .report import layer_rows, plot_channels
    from ..model.artifact import save_model
    from ..tables import format_table

    cm = sampler.cm
    recs = [r for r in records if r["index"] < o.candidates]
    ok = [r for r in recs if r["status"] == "ok"]
    base = scorer.evaluate(model)  # the unpruned model on the same subset, for reference
    g0, p0 = cm.gflops(), cm.params()
    best_rec, best_model = top[0]
    counts = best_rec["counts"]
    headers, rows = layer_rows(cg, cm, counts, cm.per_layer(), cm.per_layer(counts))
    summary = [{"rank": k + 1, "candidate": r["index"], "flops_ratio": r["flops_ratio"], "gflops": r["gflops"],
                "params": r["params"], "map50": r["map50"], "map": r["map"]} for k, (r, _) in enumerate(top)]
    opts = {k: v for k, v in asdict(o).items() if k != "progress"}
    report = {
        "stage": "eagleeye", "parent": str(o.weights or o.cfg), "options": opts, "imgsz": o.imgsz,
        "candidate": best_rec["index"], "metric": o.metric, "score": best_rec[o.metric],
        "params_before": p0, "gflops_before": g0, "params": best_rec["params"], "gflops": best_rec["gflops"],
        "flops_ratio": best_rec["flops_ratio"],
        "map50": best_rec["map50"], "map": best_rec["map"], "precision": best_rec["precision"],
        "recall": best_rec["recall"],
        "base_map50": base["map50"], "base_map": base["map"],
        "eval_images": sum(len(b[2]) for b in scorer.val_batches),
        "bn_images": sum(len(b[2]) for b in scorer.bn_batches),
        "sampled": len(recs), "evaluated": len(ok), "evaluated_share": len(ok) / max(len(recs), 1),
        "seconds_per_candidate": float(np.mean([r["seconds"] for r in ok])) if ok else None,
        "wall_seconds_per_candidate": wall / n_new if n_new else None,
        "search_seconds": round(wall, 2), "world_size": world,
        "top": summary,
        "groups": {g.name: {"kept": counts.get(g.name, g.size), "size": g.size, "layers": list(g.layers),
                            **({} if g.prunable else {"not_pruned": g.reason})}
                   for g in cg.groups if g.modules},
        "layers": [dict(zip(headers, r)) for r in rows],
    }
    top_dir = out / "top"
    if top_dir.is_dir():  # drop artifacts of an earlier run with a larger --top-k
        for d in top_dir.iterdir():
            if d.is_dir() and d.name.isdigit() and int(d.name) > len(top):
                shutil.rmtree(d)
    for k, (r, m) in enumerate(top):
        save_model(m, top_dir / str(k + 1), {
            "stage": "eagleeye", "parent": str(o.weights or o.cfg), "imgsz": o.imgsz, "rank": k + 1,
            "candidate": r["index"], "metric": o.metric, "score": r[o.metric], "params": r["params"],
            "gflops": r["gflops"], "flops_ratio": r["flops_ratio"], "map50": r["map50"], "map": r["map"],
            "counts": r["counts"]})
    save_model(best_model, out, report)
    plot_channels(cg, counts, out / "channels.png")
    plot_scatter(recs, out / "scatter.png", o.metric, o.remain_ratio, o.delta, [r for r, _ in top])

    print(format_table(headers, rows))
    print(f"\ntop {len(top)} of {len(ok)} evaluated candidates ({len(ok)}/{len(recs)} = "
          f"{len(ok) / max(len(recs), 1):.1%} of sampled strategies inside the FLOPs window), scored on "
          f"{report['eval_images']} val images after adaptive BN on {report['bn_images']} train images:")
    print(format_table(["rank", "candidate", "FLOPs ratio", "params", "GFLOPs", "mAP50", "mAP50-95"],
                       [[s["rank"], s["candidate"], f"{s['flops_ratio']:.4f}", s["params"], f"{s['gflops']:.3f}",
                         f"{s['map50']:.4f}", f"{s['map']:.4f}"] for s in summary]))
    spc = report["wall_seconds_per_candidate"]
    print(f"\nbest: candidate {best_rec['index']}: {g0:.3f} -> {best_rec['gflops']:.3f} GFLOPs at {o.imgsz} "
          f"(kept {best_rec['flops_ratio']:.1%}; asked {o.remain_ratio:.0%} +- {o.delta:.0%}), params {p0:,} -> "
          f"{best_rec['params']:,}; {o.metric} {best_rec[o.metric]:.4f} (unpruned {base[o.metric]:.4f})"
          + (f"; {spc:.2f} s per candidate" if spc else ""))
    print(f"wrote {out} (model.yaml, weights.pt, report.json, candidates.jsonl, scatter.png, channels.png, "
          f"top/1..{len(top)}); fine-tune with: compress train --weights {out} --data {o.data}")
    return report


def plot_scatter(records, path, metric: str, remain_ratio: float, delta: float, top=()) -> None:
    """PNG scatter of FLOPs ratio against score for every evaluated candidate (top-k and best marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..fileio import atomic_path

    ok = [r for r in records if r["status"] == "ok"]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter([r["flops_ratio"] for r in ok], [r[metric] for r in ok], s=12, alpha=0.6, label="candidates")
    if top:
        ax.scatter([r["flops_ratio"] for r in top], [r[metric] for r in top], s=30, color="tab:orange",
                   label=f"top {len(top)}")
        ax.scatter([top[0]["flops_ratio"]], [top[0][metric]], s=120, marker="*", color="tab:red", label="best")
    for x, ls in ((remain_ratio - delta, ":"), (remain_ratio, "--"), (remain_ratio + delta, ":")):
        ax.axvline(x, color="gray", ls=ls, lw=1)
    ax.set_xlabel("FLOPs ratio (of the original model)")
    ax.set_ylabel({"map50": "mAP@0.5", "map": "mAP@0.5:0.95"}[metric] + " after adaptive BN")
    ax.set_title(f"EagleEye: {len(ok)} candidates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


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
