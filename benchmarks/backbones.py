"""The lightweight backbones side by side with CSP-YOLOv5: size, GFLOPs, onnxruntime latency, and (with
--quality) what EagleEye at 60% of the FLOPs + fine-tuning keeps of each one's mAP.

Size and speed (default)::

    python benchmarks/backbones.py --imgsz 640 --runs 20 --rounds 4 --out runs/bench/backbones

  For yolov5s, yolov5l and every shipped ``<family>-yolov5{s,l}`` config: params, GFLOPs (thop) at --imgsz
  and onnxruntime CPU latency (batch 1) with 1 and with 2 intra-op threads. Within one thread count every
  model is measured in the same interleaved rounds (:func:`compress.export.compare_latency`), so the
  ratios to yolov5s hold on a shared machine.

Accuracy (--quality)::

    python benchmarks/backbones.py --quality --families ghostnet mobilenetv3s --train-imgsz 160 --epochs 15 \\
        --finetune-epochs 5 --candidates 10 --out runs/bench/backbones

  For yolov5s and each family's yolov5s-size config: trains a base on the synthetic set (made in OUT/data),
  runs EagleEye at --remain-ratio (the ``compress eagleeye`` stage), fine-tunes the best candidate, then
  measures mAP@0.5:0.95 on the whole val split and, side by side, the latency at --imgsz of every base and
  pruned model. Prints mAP kept (pruned / base), the latency ratio (pruned / base) and each model's latency
  and mAP next to CSP-YOLOv5s pruned the same way. Finished steps in --out are reused, so the training can
  be split over processes (``--train-only --families ... [--no-baseline]``, OMP_NUM_THREADS=1 each) and a
  last run over all families prints the table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slim import finished_training, newer, run_training  # noqa: E402

from compress.data.dataset import create_dataloader, load_data_yaml  # noqa: E402
from compress.data.synth import make_synthetic_dataset  # noqa: E402
from compress.engine.trainer import TrainOptions, select_device  # noqa: E402
from compress.engine.validate import evaluate_model  # noqa: E402
from compress.export import compare_latency  # noqa: E402
from compress.fileio import write_json, write_text  # noqa: E402
from compress.model.artifact import load_model, read_report  # noqa: E402
from compress.model.yolo import load_cfg  # noqa: E402
from compress.stages.eagleeye import EagleEyeOptions, run as search  # noqa: E402
from compress.tables import format_table  # noqa: E402

FAMILIES = ("ghostnet", "shufflenetv2", "mobilenetv3s", "efficientlite0", "pplcnet")


def size_and_speed(args) -> tuple[list, list]:
    """Headers and rows of the size/latency table, every model measured side by side per thread count."""
    names = ["yolov5s", "yolov5l"] + [f"{f}-yolov5{s}" for f in args.families for s in "sl"]
    models = {}
    for n in names:
        d = load_cfg(n)
        d["nc"] = args.nc
        models[n] = load_model(d).eval()
    by_threads = {t: {r["model"]: r for r in compare_latency(models, args.imgsz, args.runs, t, args.rounds)}
                  for t in (1, 2)}
    ref = {t: by_threads[t]["yolov5s"]["median_ms"] for t in (1, 2)}
    rows = []
    for n in names:
        r1, r2 = by_threads[1][n], by_threads[2][n]
        rows.append([n, f"{r1['params']:,}", f"{r1['gflops']:.2f}", f"{r1['median_ms']:.1f}",
                     f"{r1['median_ms'] / ref[1]:.2f}", f"{r2['median_ms']:.1f}", f"{r2['median_ms'] / ref[2]:.2f}"])
    headers = ["model", "params", f"GFLOPs@{args.imgsz}", "ms 1 thread", "x yolov5s", "ms 2 threads", "x yolov5s"]
    return headers, rows


def prepare(args, name: str, data_yaml: Path) -> tuple[Path, Path]:
    """Train the base of ``name``, search it with EagleEye and fine-tune the best: ``(base, fine-tuned)``."""
    out = Path(args.out) / name
    base, ee, ft = out / "base", out / "eagleeye", out / "finetune"

    def opts(run, **kw):
        return TrainOptions(data=str(data_yaml), imgsz=args.train_imgsz, batch=args.batch, workers=args.workers,
                            seed=args.seed, out=str(run), progress=False, optimizer=args.optimizer, hyp=args.hyp,
                            nbs=args.nbs, **kw)

    cfg = load_cfg(name)
    cfg.update(nc=args.synth_classes)
    run_training(opts(base, cfg=cfg, epochs=args.epochs), [])
    if read_report(ee).get("stage") == "eagleeye" and newer(ee, base):
        print(f"[skip] {ee} is searched")
    else:
        if ee.exists():
            shutil.rmtree(ee)
        search(EagleEyeOptions(weights=str(base), data=str(data_yaml), imgsz=args.train_imgsz,
                               remain_ratio=args.remain_ratio, candidates=args.candidates, bn_batches=args.bn_batches,
                               eval_batches=args.eval_batches, batch=args.batch, top_k=1, workers=args.workers,
                               seed=args.seed, out=str(ee)))
    run_training(opts(ft, weights=str(ee), epochs=args.finetune_epochs), [], parent=ee)
    return base, ft


def quality(args) -> tuple[list, list]:
    """Headers and rows of the accuracy table (trains what is not trained yet)."""
    out = Path(args.out)
    data_yaml = out / "data" / "data.yaml"
    if not data_yaml.is_file():
        make_synthetic_dataset(out / "data", n_train=args.synth_train, n_val=args.synth_val,
                               imgsz=args.train_imgsz, classes=args.synth_classes, seed=args.seed)
    names = ["yolov5s"] * args.baseline + [f"{f}-yolov5s" for f in args.families]
    runs = {n: prepare(args, n, data_yaml) for n in names}
    if args.train_only:
        return [], []
    if not all(finished_training(r) for pair in runs.values() for r in pair):
        raise SystemExit("some runs are not finished")
    data = load_data_yaml(data_yaml)
    loader = create_dataloader(data["val"], args.train_imgsz, args.batch, augment=False, workers=args.workers)[0]
    dev = select_device("cpu")
    maps, models = {}, {}
    for n, (base, ft) in runs.items():
        for tag, run in (("base", base), ("pruned", ft)):
            m = load_model(run).eval()
            maps[n, tag] = evaluate_model(m, loader, data, dev)["map"]
            models[f"{n} {tag}"] = m
    lat = {r["model"]: r for r in compare_latency(models, args.imgsz, args.runs, args.threads, args.rounds)}
    csp = lat["yolov5s pruned"]
    rows = []
    for n in names:
        b, p = lat[f"{n} base"], lat[f"{n} pruned"]
        rows.append([n, f"{maps[n, 'base']:.3f}", f"{maps[n, 'pruned']:.3f}",
                     f"{maps[n, 'pruned'] / max(maps[n, 'base'], 1e-9):.1%}", f"{p['gflops'] / b['gflops']:.2f}",
                     f"{b['median_ms']:.1f}", f"{p['median_ms']:.1f}", f"{p['median_ms'] / b['median_ms']:.2f}",
                     f"{p['median_ms'] / csp['median_ms']:.2f}",
                     f"{maps[n, 'pruned'] - maps['yolov5s', 'pruned']:+.3f}"])
    headers = ["model", "base mAP", "pruned+ft mAP", "mAP kept", "FLOPs ratio", "base ms", "pruned ms",
               "latency ratio", "ms x yolov5s pruned", "mAP - yolov5s pruned"]
    return headers, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--imgsz", type=int, default=640, help="latency (and GFLOPs) image size")
    ap.add_argument("--runs", type=int, default=20, help="latency runs per model")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved latency rounds")
    ap.add_argument("--nc", type=int, default=80, help="classes of the size/speed models")
    ap.add_argument("--quality", action="store_true", help="train, EagleEye, fine-tune and compare mAP")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the --quality latencies")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="include CSP-YOLOv5s (needed for the table; --no-baseline to split the training)")
    ap.add_argument("--train-only", action="store_true", help="with --quality: train what is missing, no table")
    ap.add_argument("--train-imgsz", type=int, default=160)
    ap.add_argument("--synth-train", type=int, default=300)
    ap.add_argument("--synth-val", type=int, default=100)
    ap.add_argument("--synth-classes", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--remain-ratio", type=float, default=0.6)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--bn-batches", type=int, default=5)
    ap.add_argument("--eval-batches", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--optimizer", default="AdamW", choices=["SGD", "Adam", "AdamW"])
    ap.add_argument("--hyp", default="adamw-fast")
    ap.add_argument("--nbs", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/backbones")
    args = ap.parse_args(argv)
    if args.quality and not (args.baseline or args.train_only):
        ap.error("the --quality table compares with yolov5s: --no-baseline only with --train-only")
    t0 = time.time()
    headers, rows = quality(args) if args.quality else size_and_speed(args)
    if not rows:
        print(f"trained {', '.join(args.families)} in {time.time() - t0:.0f}s (--train-only: no table)")
        return
    kind = "quality" if args.quality else "speed"
    head = (f"backbones ({kind}): onnxruntime CPU latency at {args.imgsz}px, batch 1, median of {args.runs} runs "
            f"in {args.rounds} interleaved rounds")
    print("\n" + head + "\n" + format_table(headers, rows))
    out = Path(args.out)
    write_text(out / f"{kind}.md", head + "\n\n" + format_table(headers, rows, markdown=True) + "\n")
    write_json(out / f"{kind}.json", {"options": vars(args), "headers": headers, "rows": rows})
    print(f"\nwrote {out / (kind + '.md')} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
