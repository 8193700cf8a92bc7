"""EagleEye search: speed against the compute floor, and (with --quality) accuracy after fine-tuning.

Speed (default)::

    python benchmarks/eagleeye.py [--cfg yolov5n | --weights W] [--data D] --candidates 20 --imgsz 320 \\
        --bn-batches 20 --eval-batches 10 --batch 32 --out runs/bench/eagleeye

  Runs the search (the library function ``compress eagleeye`` calls) and compares its wall seconds per
  candidate with the compute floor: the adaptive-BN forward passes plus the evaluation forward passes of one
  candidate measured alone (median over a few of the search's candidates, after a warm-up). Also the share
  of sampled strategies inside the FLOPs window and the sampler's cost, over --strategies strategies.
  Without --data a synthetic dataset just large enough for the batches is made in --out.

Quality (--quality, needs a trained --weights and --data)::

    python benchmarks/eagleeye.py --quality --weights runs/train/exp --data data.yaml --candidates 200 \\
        --epochs 30 --corr-n 5 --corr-epochs 5 --imgsz 320 --out runs/bench/eagleeye-q

  Searches at --remain-ratio, fine-tunes the best with train(); prunes uniformly (same channel ratio in every
  group, L1 ranking) to the same FLOPs and fine-tunes that the same way; prints params, GFLOPs,
  onnxruntime latency and mAP@0.5 / mAP@0.5:0.95 on the full val split for base, best and uniform before
  and after fine-tuning; then fine-tunes --corr-n candidates spread over the score range for --corr-epochs
  and prints the Spearman rank correlation between their adaptive-BN score and fine-tuned mAP. Every
  finished step in --out is reused when the script is run again.

Samplers (--samplers, needs a trained --weights and --data)::

    python benchmarks/eagleeye.py --samplers --weights runs/train/exp --data data.yaml --candidates 36 \
        --metric map --corr-n 12 --corr-epochs 3 --imgsz 256 --out runs/bench/eagleeye-samplers

  Runs one search per --sampler (uniform: the paper's draw-then-filter; scaled: one draw scaled into the
  window) with the same seed and options, fine-tunes --corr-n candidates of each spread over its score range
  (the search's best among them) for --corr-epochs, and prints one table side by side: share of draws inside
  the FLOPs window and draws per candidate, sampler and search seconds per candidate, share of groups at
  full width, the best candidate's fine-tuned mAP@0.5:0.95, and the Spearman rank correlation between
  adaptive-BN score and fine-tuned --metric with a 95% percentile-bootstrap interval (2000 resamples of the
  candidates). Finished steps in --out are reused.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.engine.trainer import select_device  # noqa: E402
from compress.fileio import write_json  # noqa: E402
from compress.prune.eagleeye import SAMPLERS, full_width_share, strategy_stats  # noqa: E402
from compress.stages.eagleeye import (  # noqa: E402
    EagleEyeOptions, load_search_model, make_scorer, rank_key, read_candidates, run as search,
)
from compress.tables import format_table  # noqa: E402


def options(a, out, **kw) -> EagleEyeOptions:
    o = EagleEyeOptions(data=str(a.data), weights=a.weights, cfg=a.cfg, remain_ratio=a.remain_ratio,
                        candidates=a.candidates, delta=a.delta, bn_batches=a.bn_batches, eval_batches=a.eval_batches,
                        batch=a.batch, metric=a.metric, top_k=a.top_k, seed=a.seed, imgsz=a.imgsz, out=str(out),
                        workers=a.workers, device=a.device, progress=not a.no_progress, sampler=a.sampler)
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def synth_data(a, out: Path) -> Path:
    from compress.data.synth import make_synthetic_dataset

    target = out / "data"
    if (target / "data.yaml").is_file():
        return target / "data.yaml"
    print(f"synthesizing {a.bn_batches * a.batch} train / {a.eval_batches * a.batch} val images into {target}")
    return make_synthetic_dataset(target, n_train=a.bn_batches * a.batch, n_val=a.eval_batches * a.batch,
                                  imgsz=a.imgsz, classes=4, seed=0)


# ------------------------------------------------------------------------------------------------ speed
def floor_seconds(scorer, model) -> dict:
    """Seconds of the pure compute of one candidate: adaptive-BN forward passes + eval forward passes."""
    sync = torch.cuda.synchronize if scorer.device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    scorer.recalibrate(model)
    sync()
    bn = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for imgs, *_ in scorer.val_batches:
            model(imgs.float() / 255)
    sync()
    return {"bn": bn, "eval_fwd": time.perf_counter() - t}


def speed(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.data:
        a.data = synth_data(a, out)
    o = options(a, out / "search")
    inp, data, sampler = load_search_model(o)

    st = strategy_stats(sampler, a.seed, a.strategies)
    t = time.perf_counter()
    rep = search(o).to_dict()
    total = time.perf_counter() - t

    # the floor, on a few of the search's own candidates (each measured alone, after one warm-up pass)
    scorer = make_scorer(o, inp, data, select_device(o.device))
    recs = [r for r in read_candidates(out / "search" / "candidates.jsonl") if r["status"] == "ok"]
    pick = [recs[int(i)] for i in np.linspace(0, len(recs) - 1, min(a.floor_n, len(recs)))]
    parts = {"build": [], "bn": [], "eval_fwd": [], "eval_total": []}
    floor_seconds(scorer, scorer.build(pick[0]["counts"]))  # warm-up
    for r in pick:
        t = time.perf_counter()
        m = scorer.build(r["counts"])
        parts["build"].append(time.perf_counter() - t)
        f = floor_seconds(scorer, m)
        parts["bn"].append(f["bn"])
        parts["eval_fwd"].append(f["eval_fwd"])
        t = time.perf_counter()
        scorer.evaluate(m)
        parts["eval_total"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in parts.items()}
    floor = med["bn"] + med["eval_fwd"]
    wall = rep["wall_seconds_per_candidate"]
    rows = [
        ["candidates searched", rep["sampled"], ""],
        ["share of sampled strategies evaluated (search)", f"{rep['evaluated_share']:.1%}", ""],
        [f"share inside the FLOPs window ({st['n']} strategies)", f"{st['share']:.1%}",
         f"FLOPs ratio {st['min_ratio']:.4f}..{st['max_ratio']:.4f}"],
        [f"--sampler {a.sampler}: draws per strategy", f"{st['draws_per_strategy']:.1f}",
         f"{st['acceptance']:.3%} of draws inside the window"],
        ["sampler: ms per strategy", f"{st['us_per_strategy'] / 1e3:.2f}", "cost model only, no build"],
        ["build pruned model (apply plan + Model + load), s", f"{med['build']:.3f}", "median"],
        ["adaptive BN forward passes, s", f"{med['bn']:.3f}", f"{a.bn_batches} x {a.batch} images"],
        ["eval forward passes, s", f"{med['eval_fwd']:.3f}", f"{a.eval_batches} x {a.batch} images"],
        ["eval incl. NMS + metrics, s", f"{med['eval_total']:.3f}", ""],
        ["compute floor (BN + eval forwards), s", f"{floor:.3f}", ""],
        ["search wall s per candidate", f"{wall:.3f}", f"total {total:.1f} s incl. loading and outputs"],
        ["wall / floor", f"{wall / floor:.2f}x", "target <= 1.2x"],
    ]
    dev = o.device if o.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nEagleEye speed: {a.weights or a.cfg} at {a.imgsz}px, remain {a.remain_ratio} +- {a.delta}, {dev}")
    print(format_table(["measure", "value", "note"], rows))
    res = {"sampled": rep["sampled"], "evaluated_share": rep["evaluated_share"], "window": st,
           "median_seconds": med, "floor_seconds": floor, "wall_seconds_per_candidate": wall,
           "wall_over_floor": wall / floor, "search_seconds": total}
    write_json(out / "speed.json", res)
    return res


# ------------------------------------------------------------------------------------------------ quality
def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties), numpy only."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        _, inv, cnt = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, r)
        return sums[inv] / cnt[inv]
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def spearman_ci(x, y, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """Percentile-bootstrap interval of :func:`spearman` (pairs resampled with replacement; resamples whose
    ranks are constant are dropped)."""
    x, y = np.asarray(x), np.asarray(y)
    rng = np.random.default_rng(seed)
    rhos = [spearman(x[i], y[i]) for i in rng.integers(0, len(x), (resamples, len(x)))]
    rhos = np.array([r for r in rhos if np.isfinite(r)])
    if not len(rhos):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(rhos, tail)), float(np.percentile(rhos, 100 - tail))


def finetune(a, weights, out: Path, epochs: int) -> Path:
    """Fine-tune an artifact with the trainer (skipped when ``out`` holds a finished run)."""
    from compress.engine.trainer import TrainOptions, train

    rep = out / "report.json"
    if rep.is_file() and json.loads(rep.read_text()).get("final_epoch"):
        return out
    train(TrainOptions(data=str(a.data), weights=str(weights), epochs=epochs, imgsz=a.imgsz, batch=a.ft_batch,
                       device=a.device, workers=a.workers, out=str(out), seed=a.seed, progress=not a.no_progress,
                       optimizer=a.optimizer, hyp=a.hyp, nbs=a.nbs))
    return out


def _key(path) -> str:
    """Cache key of an artifact: its path and the time its weights were written (a re-run step invalidates it)."""
    p = Path(path)
    w = p / "weights.pt" if p.is_dir() else p
    return f"{p}@{w.stat().st_mtime_ns if w.exists() else 0}"


def full_val(a, path, cache: dict) -> dict:
    """mAP on the whole val split (the same evaluate() the trainer and `compress val` use), cached by path."""
    from compress.data.dataset import create_dataloader, load_data_yaml
    from compress.engine.trainer import select_device
    from compress.engine.validate import evaluate, torch_predictor
    from compress.model.artifact import load_model

    key = _key(path)
    if key not in cache:
        data = load_data_yaml(a.data)
        loader, _ = create_dataloader(data["val"], a.imgsz, a.batch, augment=False, workers=a.workers, nc=data["nc"])
        res = evaluate(torch_predictor(load_model(path), select_device(a.device)), loader, data["nc"], data["names"],
                       progress=False)
        cache[key] = {"map50": res["map50"], "map": res["map"]}
    return cache[key]


def latency(a, path, cache: dict) -> float:
    from compress.export import export_onnx, onnx_latency
    from compress.model.artifact import load_model

    key = "latency:" + _key(path)
    if key not in cache:
        onnx = export_onnx(load_model(path), Path(a.out) / "onnx" / (Path(path).name + ".onnx"), a.imgsz)
        cache[key] = onnx_latency(onnx, a.imgsz, runs=a.runs, threads=a.threads)["median_ms"]
    return cache[key]


def quality(a):
    from compress.model.artifact import load_model, save_model
    from compress.model.profile import profile
    from compress.prune import apply_plan_to_model, keep_counts_for_ratio, plan_from_counts

    if not a.weights or not a.data:
        raise SystemExit("--quality needs a trained --weights and --data")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_f = out / "quality_cache.json"
    cache = json.loads(cache_f.read_text()) if cache_f.is_file() else {}

    def save_cache():
        write_json(cache_f, cache)

    # 1. the search (reused when its report exists, resumed when it was interrupted)
    o = options(a, out / "search", resume=(out / "search" / "search.json").is_file())
    if not (out / "search" / "report.json").is_file():
        search(o)
    srep = json.loads((out / "search" / "report.json").read_text())
    inp, data, sampler = load_search_model(o)
    model, cg = inp.model, inp.groups
    scorer = make_scorer(o, inp, data, select_device(o.device))

    # 2. uniform channel ratio at the same FLOPs budget, L1 ranking, same adaptive BN
    uni = out / "uniform"
    if not (uni / "report.json").is_file():
        counts = keep_counts_for_ratio(cg, a.remain_ratio, a.imgsz, scorer.scores, mode="uniform")
        m = apply_plan_to_model(model, plan_from_counts(cg, counts, scorer.scores), cg)
        scorer.recalibrate(m)
        res = scorer.evaluate(m)
        save_model(m, uni, {"stage": "uniform", "imgsz": a.imgsz, "gflops": sampler.cm.gflops(counts),
                            "flops_ratio": sampler.cm.macs(counts) / sampler.base_macs,
                            "subset_map50": res["map50"], "subset_map": res["map"]})
    # 3. fine-tune both the same way
    ft_best = finetune(a, out / "search", out / "ft_best", a.epochs)
    ft_uni = finetune(a, uni, out / "ft_uniform", a.epochs)

    rows = []
    steps = (("base", a.weights, a.weights), ("EagleEye best (adaptive BN)", out / "search", out / "search"),
             ("EagleEye best, fine-tuned", ft_best, out / "search"),
             ("uniform L1 (adaptive BN)", uni, uni), ("uniform L1, fine-tuned", ft_uni, uni))
    for name, path, arch in steps:  # latency depends on the architecture only: measured before fine-tuning
        prof = profile(load_model(path), a.imgsz)
        lat = latency(a, arch, cache)
        v = full_val(a, path, cache)
        save_cache()
        rows.append([name, prof["params"], f"{prof['gflops']:.3f}", f"{lat:.1f}", f"{v['map50']:.4f}",
                     f"{v['map']:.4f}"])
    print(f"\nEagleEye quality: remain {a.remain_ratio} of FLOPs, {srep['sampled']} candidates, fine-tune "
          f"{a.epochs} epochs, mAP on the full val split at {a.imgsz}px, onnxruntime CPU {a.threads} threads")
    print(format_table(["model", "params", "GFLOPs", "latency ms", "mAP50", "mAP50-95"], rows))

    # 4. does the adaptive-BN score predict the fine-tuned accuracy?
    corr = correlation(a, out, read_candidates(out / "search" / "candidates.jsonl"), lambda: scorer, cache)
    save_cache()
    print(f"\nadaptive-BN score vs mAP after {a.corr_epochs} fine-tune epochs ({a.metric}):")
    print(format_table(["candidate", "FLOPs ratio", "adaptive-BN score", "fine-tuned"], corr["rows"]))
    print(f"Spearman rank correlation: {corr['spearman']:.3f} (95% percentile bootstrap "
          f"[{corr['ci95'][0]:.3f}, {corr['ci95'][1]:.3f}]) over {len(corr['rows'])} candidates")
    write_json(out / "quality.json", {"rows": rows, "correlation": corr})


def correlation(a, out: Path, records, get_scorer, cache: dict) -> dict:
    """Fine-tune ``--corr-n`` of a search's candidates spread evenly over its score range (the best included)
    for ``--corr-epochs`` and correlate their adaptive-BN score with their fine-tuned ``--metric``.

    Candidate artifacts and fine-tunes live in ``out/corr/<index>`` and are reused; ``get_scorer()`` (the
    search's :class:`CandidateScorer`) is only called when an artifact must be built. Returns the table rows,
    the per-candidate values, the best candidate's and the Spearman correlation with its bootstrap interval.
    """
    from compress.model.artifact import save_model

    recs = sorted((r for r in records if r["status"] == "ok"), key=lambda r: rank_key(r, a.metric))
    pick = [recs[int(i)] for i in np.unique(np.linspace(0, len(recs) - 1, min(a.corr_n, len(recs))).round())]
    rows, xs, fts = [], [], []
    for r in pick:
        d = out / "corr" / str(r["index"])
        if not (d / "init" / "report.json").is_file():
            m, _ = get_scorer().score(r["counts"])
            save_model(m, d / "init", {"stage": "eagleeye-candidate", "candidate": r["index"], "imgsz": a.imgsz})
        v = full_val(a, finetune(a, d / "init", d / "ft", a.corr_epochs), cache)
        xs.append(r[a.metric])
        fts.append(v)
        rows.append([r["index"], f"{r['flops_ratio']:.4f}", f"{r[a.metric]:.4f}", f"{v[a.metric]:.4f}"])
    ys = [v[a.metric] for v in fts]
    rho = spearman(xs, ys) if len(xs) > 1 else float("nan")
    lo, hi = spearman_ci(xs, ys) if len(xs) > 2 else (float("nan"), float("nan"))
    return {"rows": rows, "candidates": [r["index"] for r in pick], "scores": xs, "finetuned": fts,
            "best": {"candidate": pick[-1]["index"], "score": xs[-1], **fts[-1]},
            "spearman": rho, "ci95": [lo, hi], "ci_method": "percentile bootstrap, 2000 resamples"}


# ------------------------------------------------------------------------------------------------ samplers
def samplers(a):
    """One search per sampler with the same options, compared side by side (see the module docstring)."""
    if not a.weights or not a.data:
        raise SystemExit("--samplers needs a trained --weights and --data")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_f = out / "quality_cache.json"
    cache = json.loads(cache_f.read_text()) if cache_f.is_file() else {}
    res = {}
    for k in SAMPLERS:
        d = out / k
        o = options(a, d / "search", resume=(d / "search" / "search.json").is_file(), sampler=k)
        if not (d / "search" / "report.json").is_file():
            search(o)
        rep = json.loads((d / "search" / "report.json").read_text())
        inp, data, sampler = load_search_model(o)
        st = strategy_stats(sampler, a.seed, a.strategies)
        recs = [r for r in read_candidates(d / "search" / "candidates.jsonl") if r["status"] == "ok"]
        get_scorer = functools.cache(lambda o=o, inp=inp, data=data: make_scorer(o, inp, data,
                                                                                 select_device(o.device)))
        corr = correlation(a, d, recs, get_scorer, cache)
        write_json(cache_f, cache)
        res[k] = {"search": {x: rep[x] for x in ("sampled", "evaluated", "acceptance", "draws_per_candidate",
                                                 "wall_seconds_per_candidate", "search_seconds")},
                  "strategies": st, "full_width_search": full_width_share(sampler, [r["counts"] for r in recs]),
                  "correlation": corr}
    _print_samplers(a, res)
    write_json(out / "samplers.json", res)
    return res


def _print_samplers(a, res) -> None:
    def row(name, f):
        return [name, *(f(res[k]) for k in SAMPLERS)]

    n = a.strategies
    label = {"map50": "mAP@0.5", "map": "mAP@0.5:0.95"}[a.metric]
    rows = [
        row("candidates searched (inside the window)", lambda r: f"{r['search']['sampled']} ({r['search']['evaluated']})"),
        row("share of draws inside the window", lambda r: f"{r['search']['acceptance']:.3%}"),
        row("draws per candidate", lambda r: f"{r['search']['draws_per_candidate']:.1f}"),
        row(f"  same, over {n} strategies", lambda r: f"{r['strategies']['draws_per_strategy']:.1f} "
                                                 f"({r['strategies']['acceptance']:.3%} inside)"),
        row("sampler ms per candidate", lambda r: f"{r['strategies']['us_per_strategy'] / 1e3:.2f}"),
        row("search wall s per candidate", lambda r: f"{r['search']['wall_seconds_per_candidate']:.2f}"),
        row("groups at full width (search's candidates)", lambda r: f"{r['full_width_search']:.1%}"),
        row(f"  same, over {n} strategies", lambda r: f"{r['strategies']['full_width']:.1%}"),
        row("FLOPs ratio of the strategies (mean)", lambda r: f"{r['strategies']['mean_ratio']:.4f}"),
        row(f"best candidate: index, adaptive-BN {a.metric}",
            lambda r: f"{r['correlation']['best']['candidate']}, {r['correlation']['best']['score']:.4f}"),
        row(f"best candidate fine-tuned mAP@0.5:0.95 ({a.corr_epochs} ep)",
            lambda r: f"{r['correlation']['best']['map']:.4f}"),
        row(f"Spearman(adaptive-BN score, fine-tuned {label})",
            lambda r: f"{r['correlation']['spearman']:.3f} [{r['correlation']['ci95'][0]:.3f}, "
                      f"{r['correlation']['ci95'][1]:.3f}] n={len(r['correlation']['rows'])}"),
    ]
    print(f"\nEagleEye samplers: {a.weights} at {a.imgsz}px, remain {a.remain_ratio} +- {a.delta}, seed {a.seed}; "
          f"fine-tuned mAP on the full val split after {a.corr_epochs} epochs; Spearman 95% interval: percentile "
          f"bootstrap over candidates (2000 resamples)")
    print(format_table(["measure", *SAMPLERS], rows))
    for k in SAMPLERS:
        print(f"\n{k}: adaptive-BN score vs fine-tuned {a.metric}")
        print(format_table(["candidate", "FLOPs ratio", "adaptive-BN score", "fine-tuned"],
                           res[k]["correlation"]["rows"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true", help="accuracy mode (needs a trained --weights and --data)")
    ap.add_argument("--samplers", action="store_true", help="compare the strategy samplers (needs --weights, --data)")
    ap.add_argument("--sampler", default="uniform", choices=SAMPLERS, help="speed/quality: the strategy sampler")
    ap.add_argument("--cfg", default=None, help="model YAML for the speed mode with random weights (default yolov5n)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default=None, help="data.yaml (speed mode: synthesized in --out when omitted)")
    ap.add_argument("--remain-ratio", type=float, default=0.6)
    ap.add_argument("--delta", type=float, default=0.02)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--bn-batches", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--metric", default="map50", choices=["map50", "map"])
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (and onnxruntime threads; default 2)")
    ap.add_argument("--strategies", type=int, default=1000, help="speed: strategies for the window statistics")
    ap.add_argument("--floor-n", type=int, default=3, help="speed: candidates whose compute floor is measured")
    ap.add_argument("--epochs", type=int, default=30, help="quality: fine-tune epochs of best and uniform")
    ap.add_argument("--ft-batch", type=int, default=16, help="quality: fine-tune batch size")
    ap.add_argument("--corr-n", type=int, default=5, help="quality: candidates fine-tuned for the correlation")
    ap.add_argument("--corr-epochs", type=int, default=5, help="quality: their fine-tune epochs")
    ap.add_argument("--runs", type=int, default=50, help="quality: onnxruntime latency runs")
    ap.add_argument("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"], help="fine-tuning optimizer")
    ap.add_argument("--hyp", default=None, help="fine-tuning hyp YAML or shipped name (e.g. adamw-fast)")
    ap.add_argument("--nbs", type=int, default=64, help="fine-tuning nominal batch size")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="runs/bench/eagleeye")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.threads = a.threads or 2
    if not a.weights and not a.cfg:
        a.cfg = "yolov5n.yaml"
    from compress.errors import UserError

    try:
        samplers(a) if a.samplers else quality(a) if a.quality else speed(a)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
