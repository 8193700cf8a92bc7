"""Network Slimming end to end: train with and without sparsity, slim, fine-tune, and compare.

    python benchmarks/slim.py [--model yolov5n] [--data DATA.yaml] [--epochs 100] [--finetune-epochs 50]
                              [--imgsz 320] [--sparsity 1e-3] [--percents 0.5 0.6] [--out runs/bench/slim]

Smoke size (a few minutes on CPU):

    python benchmarks/slim.py --epochs 1 --finetune-epochs 1 --imgsz 64 --synth-train 32 --synth-val 16 \\
        --bn-batches 2 --eval-batches 2 --latency-runs 5 --workers 0 --out /tmp/slim-smoke

Without ``--data`` the default synthetic set (what ``compress data synth`` writes, at ``--imgsz``) is
created in ``OUT/data``. Steps (each writes an artifact under ``--out`` and is skipped when its artifact is
already complete; an interrupted training run is resumed from its last checkpoint):

1. ``base``: ``--model`` trained ``--epochs`` without sparsity (the sparsity statistics are still logged);
2. ``sparse``: the same with ``--sparsity`` (``compress train --sparsity``: :class:`SparsityCallback`);
3. ``slim-{base,sparse}-P`` for every ``P`` in ``--percents``: :func:`compress.prune.slim.slim`;
4. ``ft-{base,sparse}-P``: each slimmed artifact fine-tuned ``--finetune-epochs`` (``compress train --weights``).

Every artifact is then measured the same way: params and GFLOPs (thop) at ``--imgsz``, onnxruntime CPU
latency (batch 1) and mAP@0.5 / mAP@0.5:0.95 on the whole val split. The table goes to stdout,
``OUT/summary.md`` and ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import shutil
import json
import time
from pathlib import Path

import torch

from compress.data.dataset import create_dataloader, load_data_yaml
from compress.data.synth import make_synthetic_dataset
from compress.engine.trainer import STATE, TrainOptions, load_options, resume, save_options, select_device, train
from compress.engine.validate import evaluate_model
from compress.export import export_onnx, onnx_latency
from compress.fileio import write_json, write_text
from compress.model.artifact import load_model, read_report
from compress.model.profile import profile
from compress.prune.slim import SCHEDULES
from compress.stages.slim import SlimOptions, run as run_slim
from compress.stages.sparsity import SparsityCallback
from compress.stages.train import callbacks_from_extra
from compress.tables import format_table


def finished_training(run: Path) -> bool:
    """A training run whose final report was written (the trainer adds ``final_epoch`` at the very end)."""
    return "final_epoch" in read_report(run) and (run / "weights.pt").is_file()


def newer(run: Path, parent: Path | None) -> bool:
    """True when ``run``'s weights were written after ``parent``'s (or there is no parent)."""
    if parent is None:
        return True
    return (run / "weights.pt").stat().st_mtime_ns >= (parent / "weights.pt").stat().st_mtime_ns


def run_training(opts: TrainOptions, callbacks, parent: Path | None = None) -> None:
    """Train into ``opts.out``: skip a finished run, resume an interrupted one, else start it.

    A run older than its ``parent`` artifact (re-made since) is trained again from the start.
    """
    run = Path(opts.out)
    fresh = not (run / "weights.pt").is_file() or newer(run, parent)
    if finished_training(run) and fresh:
        print(f"[skip] {run} is trained")
        return
    if fresh and (run / "last" / STATE).is_file() and (run / "opt.yaml").is_file():
        print(f"[resume] {run}")
        resume(run, callbacks_from_extra(load_options(run).extra))
        return
    save_options(opts)
    train(opts, callbacks)


def measure(name, run: Path, data, val_loader, args, cache: dict) -> dict:
    """Params, GFLOPs, onnxruntime latency and mAP of one artifact (reused when its weights did not change)."""
    w = run / "weights.pt"
    stamp = f"{w.stat().st_mtime_ns}-{w.stat().st_size}-{args.imgsz}"
    if cache.get(name, {}).get("stamp") == stamp:
        return cache[name]
    model = load_model(run).eval()
    prof = profile(model, args.imgsz)
    onnx_path = export_onnx(model, Path(args.out) / "onnx" / f"{name}.onnx", args.imgsz)
    lat = onnx_latency(onnx_path, args.imgsz, runs=args.latency_runs, threads=args.threads)
    dev = select_device(args.device)
    res = evaluate_model(model.to(dev), val_loader, data, dev)
    cache[name] = {"stamp": stamp, "params": prof["params"], "gflops": prof["gflops"],
                   "latency_ms": lat["median_ms"], "map50": res["map50"], "map": res["map"]}
    return cache[name]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov5n", help="model YAML or shipped name (yolov5n, yolov5s, ...)")
    ap.add_argument("--data", default=None, help="data.yaml (default: the synthetic set, made in OUT/data)")
    ap.add_argument("--synth-train", type=int, default=800, help="train images of the synthetic set")
    ap.add_argument("--synth-val", type=int, default=200, help="val images of the synthetic set")
    ap.add_argument("--epochs", type=int, default=100, help="epochs of the base and sparse trainings")
    ap.add_argument("--finetune-epochs", type=int, default=50)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    # 1e-2, not the 1e-3 of COCO recipes: 800 images give ~12 optimizer steps per epoch (nominal batch 64),
    # and at lr0 0.01 / momentum 0.937 one step moves a gamma by at most ~lr * s * 16, so 1e-3 moves gammas by
    # ~0.1 over 100 epochs (less where the trainer's grad-norm clip bites), far from sparse
    ap.add_argument("--sparsity", type=float, default=1e-2, help="L1 factor of the sparse training (default 1e-2)")
    ap.add_argument("--sparsity-schedule", choices=SCHEDULES, default="constant")
    ap.add_argument("--percents", type=float, nargs="+", default=[0.5, 0.6], help="--global-percent values")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--bn-batches", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=None, help="slim's eval batches (default: all)")
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=None,
                    help="a trained artifact to use as the base: the sparse model is then trained from it "
                         "(--epochs of sparsity training) instead of both from scratch")
    ap.add_argument("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"])
    ap.add_argument("--hyp", default=None, help="hyp YAML or shipped name (e.g. adamw-fast)")
    ap.add_argument("--nbs", type=int, default=64)
    ap.add_argument("--out", default="runs/bench/slim")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()

    data_yaml = args.data
    if data_yaml is None:
        data_yaml = out / "data" / "data.yaml"
        if not data_yaml.is_file():
            make_synthetic_dataset(out / "data", n_train=args.synth_train, n_val=args.synth_val, imgsz=args.imgsz)
    data = load_data_yaml(data_yaml)
    cfg = args.model if args.model.endswith((".yaml", ".yml")) else f"{args.model}.yaml"

    def opts(name, **kw):
        return TrainOptions(data=str(data_yaml), imgsz=args.imgsz, batch=args.batch, device=args.device,
                            workers=args.workers, seed=args.seed, out=str(out / name), progress=False,
                            optimizer=args.optimizer, hyp=args.hyp, nbs=args.nbs, **kw)

    # the base run logs gamma statistics too (s = 0), so both histograms can be compared
    trainings = {"base": SparsityCallback(0.0), "sparse": SparsityCallback(args.sparsity, args.sparsity_schedule)}
    if args.base:  # sparsity-train from a trained model, as slimming is usually applied in practice
        if not (out / "base").exists():
            shutil.copytree(args.base, out / "base")
        cb = trainings["sparse"]
        run_training(opts("sparse", weights=str(out / "base"), epochs=args.epochs, extra=cb.options()), [cb],
                     parent=out / "base")
    else:
        for name, cb in trainings.items():
            run_training(opts(name, cfg=cfg, epochs=args.epochs, extra=cb.options()), [cb])

    rows = []  # (label, artifact name, source, percent)
    for src in trainings:
        rows.append((src, src, src, None))
        for p in args.percents:
            s_name, f_name = f"slim-{src}-{p:g}", f"ft-{src}-{p:g}"
            s_dir = out / s_name
            if (read_report(s_dir).get("stage") == "slim" and (s_dir / "weights.pt").is_file()
                    and newer(s_dir, out / src)):
                print(f"[skip] {s_dir} is slimmed")
            else:
                if s_dir.exists():
                    shutil.rmtree(s_dir)
                run_slim(SlimOptions(weights=str(out / src), data=str(data_yaml), global_percent=p,
                                     round_to=args.round_to, imgsz=args.imgsz, batch=args.batch,
                                     bn_batches=args.bn_batches, eval_batches=args.eval_batches or "all",
                                     workers=args.workers, device=args.device, seed=args.seed, out=str(s_dir)))
            run_training(opts(f_name, weights=str(s_dir), epochs=args.finetune_epochs), [], parent=s_dir)
            rows += [(f"{src} slim {p:g} (before fine-tune)", s_name, src, p),
                     (f"{src} slim {p:g} + fine-tune", f_name, src, p)]

    cache_file = out / "measurements.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    val_loader, _ = create_dataloader(data["val"], args.imgsz, args.batch * 2, augment=False, workers=args.workers,
                                      nc=data["nc"], prefix="val: ")
    table, summary = [], []
    for label, name, src, p in rows:
        m = measure(name, out / name, data, val_loader, args, cache)
        write_json(cache_file, cache)
        rep = read_report(out / name)
        gamma = rep.get("gamma", {}).get("lt_1e-2") if rep.get("stage") == "slim" else \
            (rep.get("sparsity") or {}).get("last_epoch", {}).get("lt_1e-2")
        removed = rep.get("channels_removed") if rep.get("stage") == "slim" else None
        entry = {"row": label, "artifact": name, "params": m["params"], "gflops": m["gflops"],
                 "latency_ms": m["latency_ms"], "map50": m["map50"], "map": m["map"],
                 "gamma_lt_1e-2": gamma, "channels_removed": removed}
        summary.append(entry)
        table.append([label, m["params"], round(m["gflops"], 3), round(m["latency_ms"], 2),
                      round(m["map50"], 4), round(m["map"], 4),
                      "" if gamma is None else f"{gamma:.1%}", "" if removed is None else f"{removed:.1%}"])
    headers = ["model", "params", "GFLOPs", "ORT latency ms", "mAP@0.5", "mAP@0.5:0.95", "gamma<1e-2",
               "channels removed"]
    head = (f"Network Slimming on {data_yaml} ({len(data['train'])} train / {len(data['val'])} val images): "
            f"{args.model}, {args.epochs} epochs (sparse: s={args.sparsity:g}, {args.sparsity_schedule}), "
            f"fine-tune {args.finetune_epochs} epochs, {args.imgsz}px, torch threads {torch.get_num_threads()}, "
            f"ORT latency batch 1 median of {args.latency_runs}")
    print("\n" + head + "\n" + format_table(headers, table))
    write_text(out / "summary.md", head + "\n\n" + format_table(headers, table, markdown=True) + "\n")
    write_json(out / "summary.json", {"options": vars(args), "rows": summary})
    print(f"\nwrote {out / 'summary.md'} and summary.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
