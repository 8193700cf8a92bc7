"""Speed of the structured pruning core: groups once, one plan applied, FLOPs of a plan from counts.

    python benchmarks/prune_speed.py [--cfg yolov5s] [--imgsz 640] [--plans 100] [--threads N]

Random plans are EagleEye-like: every prunable group keeps a random 30-100% of its channels, rounded to a
multiple of 8, chosen by L1 norm. thop and torch-pruning's DependencyGraph are timed for reference.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import numpy as np
import torch

from compress.model.profile import profile
from compress.model.yolo import Model
from compress.prune import (
    apply_plan, build_pruned, channel_groups, keep_counts_for_ratio, l1_scores, plan_from_counts, round_keep,
)
from compress.tables import format_table


def timed(fn, n):
    """Median and min wall time (seconds) of ``n`` calls of ``fn``."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def random_plans(cg, scores, n, seed=0):
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        counts = {g.name: round_keep(g.size * rng.uniform(0.3, 1.0), g.size) for g in cg.prunable}
        plans.append(plan_from_counts(cg, counts, scores))
    return plans


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", default="yolov5s")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--plans", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model(f"{args.cfg}.yaml" if not args.cfg.endswith((".yaml", ".yml")) else args.cfg).eval()
    sd = model.state_dict()
    rows = []

    med, best = timed(lambda: channel_groups(model), 20)
    rows.append(["channel groups (once per architecture)", med * 1e3, best * 1e3, 20])
    cg = channel_groups(model)
    med, best = timed(lambda: cg._cost_cache.clear() or cg.cost_model(args.imgsz), 20)
    rows.append(["cost model (once per imgsz)", med * 1e3, best * 1e3, 20])
    scores = l1_scores(cg, sd)
    plans = random_plans(cg, scores, args.plans)

    it = iter(plans * 2)
    med, best = timed(lambda: apply_plan(cg, sd, next(it)), len(plans))
    rows.append(["apply plan: state_dict index_select + YAML", med * 1e3, best * 1e3, len(plans)])
    it = iter(plans * 2)
    med, best = timed(lambda: build_pruned(cg, sd, next(it)), len(plans))
    rows.append(["apply plan + build Model + load weights", med * 1e3, best * 1e3, len(plans)])

    cm = cg.cost_model(args.imgsz)
    counts = [{n: len(t) for n, t in p.items()} for p in plans]
    vecs = [cm.vector(c) for c in counts]
    k = 10000
    it = iter(vecs * (k // len(vecs) + 1))
    med, best = timed(lambda: cm.macs(next(it)), k)
    rows.append(["plan FLOPs from counts (vector)", med * 1e3, best * 1e3, k])
    it = iter(counts * (k // len(counts) + 1))
    med, best = timed(lambda: cm.gflops(next(it)), k)
    rows.append(["plan FLOPs from counts (dict)", med * 1e3, best * 1e3, k])
    for mode in ("uniform", "global"):
        med, best = timed(lambda: keep_counts_for_ratio(cg, 0.5, args.imgsz, scores, mode=mode), 10)
        rows.append([f"keep_counts_for_ratio 0.5 ({mode})", med * 1e3, best * 1e3, 10])

    # references: thop on a built model, torch-pruning's traced dependency graph
    pruned = build_pruned(cg, sd, plans[0])
    med, best = timed(lambda: profile(pruned, args.imgsz), 3)
    rows.append(["(ref) thop profile of a built model", med * 1e3, best * 1e3, 3])
    try:
        import torch_pruning as tp

        def dg():
            m = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tp.DependencyGraph().build_dependency(m, torch.zeros(1, 3, 64, 64),
                                                      ignored_layers=[m.model[-1]], verbose=False)
        med, best = timed(dg, 3)
        rows.append(["(ref) torch-pruning DependencyGraph build", med * 1e3, best * 1e3, 3])
    except ImportError:
        pass

    exact = abs(cm.gflops(counts[0]) - profile(pruned, args.imgsz)["gflops"])
    print(f"{args.cfg} at {args.imgsz}: {len(cg.prunable)} prunable groups of {len(cg.groups)}, "
          f"{sum(p.numel() for p in model.parameters()):,} params, torch threads {torch.get_num_threads()}")
    print(format_table(["operation", "median ms", "min ms", "runs"], rows))
    print(f"plan FLOPs from counts vs thop on a pruned model: |diff| = {exact:.2e} GFLOPs")


if __name__ == "__main__":
    main()
