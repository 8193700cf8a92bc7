"""The ``eagleeye`` stage: EagleEye sub-net search (Li et al., ECCV 2020).

Strategies come from the pruning core's :class:`~compress.prune.eagleeye.FlopsWindowSampler` (``--sampler
uniform``: the paper's per-group uniform draws, kept when they fall in the FLOPs window; ``scaled``: one draw
scaled into it; the cost model alone, no model built to choose one). Each candidate keeps, in every group,
its channels with the largest filter L1 norms (ranked once), gets its BatchNorm statistics re-estimated on
the same fixed training batches (adaptive BN) and is scored on the same fixed validation subset
(:class:`CandidateScorer`); the best candidates are written as artifacts for fine-tuning. :func:`run`
handles resume, sharding across torchrun ranks and the outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import unfinished_run
from ..log import warn
from ..options import DataInput, DeviceOptions, flag_name, option
from ..prune.eagleeye import SAMPLERS, FlopsWindowSampler, check_window
from ..prune.importance import l1_scores
from ..prune.plan import build_pruned, plan_from_counts
from .base import DataInfo, Report, output_dir
from .pruning import PruneCommon, load_prune_input, pruned_report, write_pruned

CANDIDATES, SEARCH = "candidates.jsonl", "search.json"
METRICS = ("map50", "map")
# Options that change which candidates are drawn or how they score: a resumed search must match them.
SEARCH_KEYS = ("weights", "cfg", "data", "remain_ratio", "delta", "min_remain", "max_remain", "round_to",
               "exclude", "imgsz", "seed", "sampler", "bn_batches", "eval_batches", "batch")
REMAIN_HELP = ("share of the model's FLOPs the sub-net KEEPS, in (0, 1] (thop convention at --imgsz; prune "
               "--ratio is the share removed)")


@dataclass(kw_only=True)
class EagleEyeOptions(PruneCommon, DataInput, DeviceOptions):
    """What ``compress eagleeye`` takes."""

    data: str | None = option(None, "dataset data.yaml (adaptive BN uses train, scoring val)", recipe=False)
    remain_ratio: float | None = option(None, REMAIN_HELP, required=True)
    candidates: int = option(200, "number of strategies to sample")
    delta: float = option(0.02, "every candidate's FLOPs lie within remain-ratio +- delta of the original")
    min_remain: float = option(0.2, "smallest per-group channel keep ratio")
    max_remain: float = option(1.0, "largest per-group channel keep ratio")
    sampler: str = option("uniform", "how strategies are drawn: uniform (the paper's: every group's keep ratio "
                                     "U(min-remain, max-remain), redrawn until the FLOPs fall in the window) or "
                                     "scaled (one draw, scaled by a common factor into the window; piles groups "
                                     "up at full width)", choices=SAMPLERS)
    bn_batches: int = option(20, "training batches for adaptive BN")
    eval_batches: int = option(10, "validation batches to score on")
    batch: int = option(32, "batch size", flags=("--batch-size",))
    metric: str = option("map50", "score: mAP@0.5 (map50) or mAP@0.5:0.95 (map)", choices=METRICS)
    top_k: int = option(5, "how many of the best to write as artifacts (top/1..K)")
    seed: int = option(0, "candidate i's strategy depends only on (seed, i); also picks the batches")
    resume: bool = option(False, "continue the search in --out from its candidates.jsonl (done candidates are "
                                 "skipped)", recipe=False)
    progress: bool = option(True, cli=False)

    def check(self):
        super().check()
        check_window(self.remain_ratio, self.delta, self.min_remain, self.max_remain, self.round_to, self.sampler)
        self.require_positive("candidates", "bn_batches", "eval_batches", "batch", "top_k")
        if not self.data:
            raise UserError("--data DATA.yaml is required")
        if not self.weights and not self.cfg:
            raise UserError("give --weights (artifact dir or .pt) and/or --cfg MODEL.yaml")
        if self.resume and not self.out:
            raise UserError("--resume needs --out DIR (the folder of the search to continue)")


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
        if isinstance(d[k], str) and Path(d[k]).exists():
            d[k] = str(Path(d[k]).resolve())
    d["exclude"] = list(d["exclude"])
    return d


def _prior_records(o: EagleEyeOptions, out: Path, sampler) -> list:
    """Records of an earlier run to resume from (validated against this run's options)."""
    if not o.resume:
        return []
    saved_f = out / SEARCH
    if not saved_f.is_file():
        raise UserError(f"--resume: {out} holds no EagleEye search (no {SEARCH}); drop --resume to start one")
    try:
        saved = json.loads(saved_f.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{saved_f}: not valid JSON (not written by compress eagleeye?)") from None
    saved.setdefault("sampler", "scaled")  # searches from before --sampler existed were all scaled
    now = _search_fingerprint(o)
    for k in SEARCH_KEYS:
        if saved.get(k) != now[k]:
            flag = flag_name(k)
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


def _sampler(o: EagleEyeOptions, groups, imgsz) -> FlopsWindowSampler:
    return FlopsWindowSampler(groups, imgsz, o.remain_ratio, o.delta, o.min_remain, o.max_remain, o.round_to,
                              o.sampler)


def _check_batches(o: EagleEyeOptions, info: DataInfo) -> None:
    info.need("train", o.bn_batches, o.batch, "--bn-batches", "bn_batches" in o.given)
    info.need("val", o.eval_batches, o.batch, "--eval-batches", "eval_batches" in o.given)


def preflight(o: EagleEyeOptions, model, info: DataInfo) -> None:
    """Before anything is written: the model fits the dataset, the excludes match, the FLOPs window can be
    drawn from (the sampler's probe), the splits hold the batches asked for."""
    from ..prune import channel_groups

    info.check_model(model)
    _sampler(o, channel_groups(model).exclude(o.exclude), o.resolved_imgsz())
    _check_batches(o, info)


def load_search_model(o: EagleEyeOptions):
    """Load what a search starts from: ``(prune input, data, sampler)``.

    The model comes from ``--weights`` (or ``--cfg`` with seeded random weights), in eval mode with the
    dataset's class names; the groups honour ``--exclude``; the sampler (``--sampler``) raises UserError when
    the FLOPs window is out of reach.
    """
    from ..data.dataset import load_data_yaml

    o.validate()
    data = load_data_yaml(o.data)
    inp = load_prune_input(o, data, seed=o.seed)
    sampler = _sampler(o, inp.groups, inp.imgsz)
    _check_batches(o, DataInfo.of(data))
    return inp, data, sampler


def make_scorer(o: EagleEyeOptions, inp, data: dict, device="cpu") -> CandidateScorer:
    """The :class:`CandidateScorer` of a search: ``--bn-batches`` shuffled train batches and ``--eval-batches``
    shuffled val batches (seeded by ``--seed``, unaugmented, loaded once)."""
    from ..engine.validate import load_batches

    bn = load_batches(data["train"], inp.imgsz, o.batch, o.bn_batches, data["nc"], seed=o.seed, shuffle=True,
                      workers=o.workers, prefix="adaptive BN: ")
    val = load_batches(data["val"], inp.imgsz, o.batch, o.eval_batches, data["nc"], seed=o.seed, shuffle=True,
                       workers=o.workers, prefix="eval: ")
    return CandidateScorer(inp.model, inp.groups, bn, val, data, device)


def run(o: EagleEyeOptions) -> Report:
    """Run an EagleEye search; returns the report of the best sub-net (on rank 0; an empty one elsewhere).

    Writes into the run folder: ``candidates.jsonl`` (one line per candidate, flushed as it goes),
    ``search.json`` (the options that define the search, checked by ``--resume``), the best sub-net as an
    artifact (BN-recalibrated weights), the ``top_k`` best as artifacts in ``top/1``, ``top/2`` ...,
    ``scatter.png`` (FLOPs ratio vs score) and ``channels.png`` (kept channels of the best).
    Under torchrun, candidate ``i`` is scored on rank ``i % world_size`` and rank 0 writes everything.
    """
    from ..engine.device import select_device

    inp, data, sampler = load_search_model(o)
    o = o.replace(imgsz=inp.imgsz)
    out = output_dir(o, "eagleeye", resume=o.resume)
    o = o.replace(out=str(out))
    device = select_device(o.device)
    prior = _prior_records(o, out, sampler)  # every rank reads it (nobody writes before the barrier)

    rank, world, device, created = _dist_setup(device)
    try:
        with unfinished_run(out, "eagleeye", enabled=rank == 0):
            scorer = make_scorer(o, inp, data, device)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
            if rank == 0:
                _start_files(o, out, prior)
            records, local_top, wall, n_new = _run_candidates(o, sampler, scorer, prior, rank, world)
            top = _gather_top(o, scorer, records, local_top, rank, world)
            if rank == 0:
                return _write_outputs(o, out, inp, sampler, scorer, records, top, wall, n_new, world)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return Report(stage="eagleeye")


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
           "counts": st.counts, "flops_ratio": st.flops_ratio, "gflops": st.gflops, "params": st.params,
           "draws": st.draws}
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
                warn(f"candidate {i} re-scored {res[o.metric]:.5f}, recorded {rec[o.metric]:.5f}")
        top.append((rec, models[i]))
    return top


def _write_outputs(o, out, inp, sampler, scorer, records, top, wall, n_new, world) -> Report:
    from ..model.artifact import save_model
    from ..tables import format_table

    recs = [r for r in records if r["index"] < o.candidates]
    ok = [r for r in recs if r["status"] == "ok"]
    base = scorer.evaluate(inp.model)  # the unpruned model on the same subset, for reference
    best_rec, best_model = top[0]
    counts = best_rec["counts"]
    summary = [{"rank": k + 1, "candidate": r["index"], "flops_ratio": r["flops_ratio"], "gflops": r["gflops"],
                "params": r["params"], "map50": r["map50"], "map": r["map"]} for k, (r, _) in enumerate(top)]
    opts = {k: v for k, v in o.to_dict().items() if k != "progress"}
    draws = sum(r.get("draws", 1) for r in recs)
    rep = pruned_report(inp, counts, "eagleeye", opts, {
        "candidate": best_rec["index"], "score_metric": o.metric, "score": best_rec[o.metric],
        "base_map50": base["map50"], "base_map": base["map"],
        "eval_images": sum(len(b[2]) for b in scorer.val_batches),
        "bn_images": sum(len(b[2]) for b in scorer.bn_batches),
        "sampler": o.sampler, "sampled": len(recs), "evaluated": len(ok),
        "evaluated_share": len(ok) / max(len(recs), 1), "draws_per_candidate": draws / max(len(recs), 1),
        "acceptance": len(ok) / max(draws, 1),
        "seconds_per_candidate": float(np.mean([r["seconds"] for r in ok])) if ok else None,
        "wall_seconds_per_candidate": wall / n_new if n_new else None,
        "search_seconds": round(wall, 2), "world_size": world, "top": summary})
    rep.set_metrics(best_rec)
    top_dir = out / "top"
    if top_dir.is_dir():  # drop artifacts of an earlier run with a larger --top-k
        for d in top_dir.iterdir():
            if d.is_dir() and d.name.isdigit() and int(d.name) > len(top):
                shutil.rmtree(d)
    for k, (r, m) in enumerate(top):
        top_rep = Report(stage="eagleeye", gflops=r["gflops"], imgsz=inp.imgsz, flops_ratio=r["flops_ratio"],
                         parent=inp.source, details={"rank": k + 1, "candidate": r["index"], "score_metric": o.metric,
                                                     "score": r[o.metric], "counts": r["counts"]})
        save_model(m, top_dir / str(k + 1), top_rep.set_metrics(r))
    write_pruned(inp, best_model, counts, out, rep,
                 title=f"eagleeye {out}: best of {len(ok)} candidates, FLOPs kept {rep.flops_ratio:.1%} "
                       f"(asked {o.remain_ratio:.0%} +- {o.delta:.0%})")
    plot_scatter(recs, out / "scatter.png", o.metric, o.remain_ratio, o.delta, [r for r, _ in top],
                 title=f"EagleEye {out}: {len(ok)} candidates at {o.remain_ratio:.0%} +- {o.delta:.0%} of the FLOPs")

    print(f"\ntop {len(top)} of {len(ok)} evaluated candidates ({len(ok)}/{len(recs)} = "
          f"{len(ok) / max(len(recs), 1):.1%} of sampled strategies inside the FLOPs window; --sampler "
          f"{o.sampler}: {rep.details['draws_per_candidate']:.1f} draws per candidate), scored on "
          f"{rep.details['eval_images']} val images after adaptive BN on {rep.details['bn_images']} train images:")
    print(format_table(["rank", "candidate", "FLOPs ratio", "params", "GFLOPs", "mAP50", "mAP50-95"],
                       [[s["rank"], s["candidate"], f"{s['flops_ratio']:.4f}", s["params"], f"{s['gflops']:.3f}",
                         f"{s['map50']:.4f}", f"{s['map']:.4f}"] for s in summary]))
    spc = rep.details["wall_seconds_per_candidate"]
    g0, p0 = rep.details["gflops_before"], rep.details["params_before"]
    print(f"\nbest: candidate {best_rec['index']}: {g0:.3f} -> {best_rec['gflops']:.3f} GFLOPs at {inp.imgsz} "
          f"(kept {best_rec['flops_ratio']:.1%}; asked {o.remain_ratio:.0%} +- {o.delta:.0%}), params {p0:,} -> "
          f"{best_rec['params']:,}; {o.metric} {best_rec[o.metric]:.4f} (unpruned {base[o.metric]:.4f})"
          + (f"; {spc:.2f} s per candidate" if spc else ""))
    print(f"wrote {out} (model.yaml, weights.pt, report.json, candidates.jsonl, scatter.png, channels.png, "
          f"top/1..{len(top)}); fine-tune with: compress train --weights {out} --data {o.data}")
    return rep


def plot_scatter(records, path, metric: str, remain_ratio: float, delta: float, top=(), title: str | None = None
                 ) -> None:
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
    ax.set_title(title or f"EagleEye: {len(ok)} candidates", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


