"""Knowledge distillation after pruning and for QAT: fine-tune with and without ``--teacher parent``.

    python benchmarks/distill.py [--epochs 80] [--finetune-epochs 20] [--qat-epochs 3] [--imgsz 160] \\
        [--seeds 0 1] [--remain-ratio 0.6] [--global-percent 0.6] [--out runs/bench/distill]

Smoke size (a few minutes)::

    python benchmarks/distill.py --epochs 1 --finetune-epochs 1 --qat-epochs 1 --imgsz 64 --synth-train 32 \\
        --synth-val 16 --candidates 2 --bn-batches 2 --eval-batches 2 --batch 8 --seeds 0 --out /tmp/distill-smoke

Everything runs through the ``compress`` CLI, as a user runs it (each step is skipped when its artifact is
finished, so the script can be rerun after a crash):

1. ``data``: the synthetic set (``compress data synth``);
2. ``base``: ``--model`` trained ``--epochs`` (the teacher);
3. ``eagleeye``: ``compress eagleeye --remain-ratio`` from base; ``slim``: ``compress slim --global-percent``
   from base (no sparsity training: what a user with only a trained model gets);
4. ``ft-{eagleeye,slim}-{plain,MODE-wW}-s{seed}``: each pruned model fine-tuned ``--finetune-epochs`` with
   the same flags, without a teacher and with ``--teacher parent --distill MODE --distill-weight W`` for each
   ``--teachers MODE:W``; the runs of one seed run at the same time (one thread each), so that their seconds
   per epoch see the same load;
5. ``qat-{plain,MODE-wW}``: ``compress qat --backend Tensorrt`` of the first seed's plain EagleEye
   fine-tune, without a teacher and with the first ``--teachers`` setting (the float base as teacher).

The table (stdout, ``OUT/summary.md``, ``OUT/summary.json``): mAP@0.5 and mAP@0.5:0.95 (the run's best
epoch on the whole val split, EMA weights, as its report.json holds them), mAP@0.5:0.95 kept vs the base,
the mean and spread over seeds, and training seconds per epoch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.fileio import write_json, write_text  # noqa: E402
from compress.model.artifact import read_report as report  # noqa: E402
from compress.tables import format_table  # noqa: E402


def finished(run: Path) -> bool:
    """A stage whose artifact is complete (weights and report written; a training run's final report)."""
    rep = report(run)
    return (run / "weights.pt").is_file() and bool(rep) and (rep.get("stage") not in ("train", "qat")
                                                             or "final_epoch" in rep)


def command(args: list, run: Path) -> list:
    """``compress ARGS --out RUN``, resuming an interrupted training run instead of starting it again (any
    other unfinished stage is removed and run again)."""
    if args[0] == "train" and (run / "last").is_dir() and (run / "opt.yaml").is_file():
        return ["compress", "train", "--resume", str(run)]
    if run.exists():
        shutil.rmtree(run)
    return ["compress", *map(str, args), "--out", str(run)]


def run_steps(steps: list, threads: int) -> None:
    """Run ``[(args, run folder)]`` at the same time (``threads`` torch threads each); skip finished ones."""
    procs = []
    for args, run in steps:
        if finished(run):
            print(f"[skip] {run}")
            continue
        cmd = command(args, run)
        print("[run]", " ".join(cmd), flush=True)
        log = open(run.parent / f"{run.name}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), run, log))
    for p, run, log in procs:
        rc = p.wait()
        log.close()
        if rc:
            sys.exit(f"{run}: failed (exit {rc}); see {run.parent / (run.name + '.log')}")


def row(name: str, run: Path, base_map: float | None, teacher: str) -> dict:
    """One table row from the run's report.json."""
    rep = report(run)
    epochs, sec, m = rep.get("final_epoch"), rep.get("train_seconds"), rep.get("map")
    return {"model": name, "teacher": teacher, "params_M": rep.get("params", 0) / 1e6, "GFLOPs": rep.get("gflops"),
            "mAP50": rep.get("map50"), "mAP50-95": m, "kept": m / base_map if base_map and m is not None else None,
            "s/epoch": sec / epochs if sec and epochs else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--synth-train", type=int, default=400)
    ap.add_argument("--synth-val", type=int, default=100)
    ap.add_argument("--synth-imgsz", type=int, default=None, help="image size of the synthetic set (default imgsz)")
    ap.add_argument("--remain-ratio", type=float, default=0.6)
    ap.add_argument("--global-percent", type=float, default=0.6)
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--bn-batches", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=5)
    ap.add_argument("--teachers", nargs="+", default=["output:3"], metavar="MODE:WEIGHT",
                    help="distillation settings to compare with plain fine-tuning (--distill MODE --distill-weight W)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/distill")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data" / "data.yaml"
    if not data.is_file():
        subprocess.run(["compress", "data", "synth", "--train", str(a.synth_train), "--val", str(a.synth_val),
                        "--imgsz", str(a.synth_imgsz or a.imgsz), "--out", str(out / "data")], check=True)
    common = ["--data", data, "--imgsz", a.imgsz, "--batch", a.batch, "--nbs", a.batch, "--optimizer", "AdamW",
              "--hyp", "adamw-fast", "--workers", a.workers]
    base = out / "base"
    run_steps([(["train", "--cfg", a.model, *common, "--epochs", a.epochs], base)], threads=2)
    search = ["--data", data, "--imgsz", a.imgsz, "--workers", a.workers]
    run_steps([(["eagleeye", "--weights", base, "--remain-ratio", a.remain_ratio, "--candidates", a.candidates,
                 "--bn-batches", a.bn_batches, "--eval-batches", a.eval_batches, "--batch", a.batch, *search],
                out / "eagleeye"),
               (["slim", "--weights", base, "--global-percent", a.global_percent, "--bn-batches", a.bn_batches,
                 "--eval-batches", a.eval_batches, "--batch", a.batch, *search], out / "slim")], threads=1)
    settings = [("plain", [])] + [(t.replace(":", "-w"), ["--teacher", "parent", "--distill", t.split(":")[0],
                                                         "--distill-weight", t.split(":")[1]]) for t in a.teachers]
    ft = {}
    for src in ("eagleeye", "slim"):
        for seed in a.seeds:
            group = []
            for name, extra in settings:
                ft[(src, name, seed)] = run = out / f"ft-{src}-{name}-s{seed}"
                group.append((["train", "--weights", out / src, *common, "--epochs", a.finetune_epochs,
                               "--seed", seed, *extra], run))
            run_steps(group, threads=1)
    qsrc = ft[("eagleeye", "plain", a.seeds[0])]
    qat, group = {}, []
    for name, extra in settings[:2]:
        qat[name] = out / f"qat-{name}"
        group.append((["qat", "--weights", qsrc, "--backend", "Tensorrt", "--data", data, "--imgsz", a.imgsz,
                       "--epochs", a.qat_epochs, "--batch", a.batch, "--calib-batches", a.bn_batches,
                       "--workers", a.workers, *extra], qat[name]))
    run_steps(group, threads=1)

    base_map = report(base).get("map")
    rows = [row("base " + a.model, base, base_map, "-")]
    summary = {"base": rows[0], "pruned": {}, "finetuned": {}, "qat": {}, "teacher_better_every_seed": {}}
    for src, label in (("eagleeye", f"EagleEye {a.remain_ratio}"), ("slim", f"slim {a.global_percent}")):
        r = row(f"{label} (no fine-tune)", out / src, base_map, "-")
        summary["pruned"][src] = r
        rows.append(r)
        for name, _ in settings:
            runs = [row(f"{label} + ft s{s}", ft[(src, name, s)], base_map, name) for s in a.seeds]
            rows += runs
            kept = [r["kept"] for r in runs if r["kept"] is not None]
            summary["finetuned"][f"{src}-{name}"] = {"runs": runs, "kept_mean": statistics.mean(kept) if kept else None,
                                                     "kept_min": min(kept) if kept else None}
            if len(kept) > 1:
                rows.append({"model": f"{label} + ft, mean of {len(kept)} seeds", "teacher": name,
                             "kept": statistics.mean(kept)})
    for name, _ in settings[:2]:
        r = row(f"QAT Tensorrt of EagleEye + ft s{a.seeds[0]}", qat[name], base_map, name)
        summary["qat"][name] = r
        rows.append(r)
    for name, _ in settings[1:]:
        summary["teacher_better_every_seed"][name] = all(
            report(ft[(src, name, s)]).get("map", 0) > report(ft[(src, "plain", s)]).get("map", 0)
            for src in ("eagleeye", "slim") for s in a.seeds)
    ranking = ", ".join(f"{k}: {v}" for k, v in summary["teacher_better_every_seed"].items())
    cols = ["model", "teacher", "params_M", "GFLOPs", "mAP50", "mAP50-95", "kept", "s/epoch"]

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return ""
        if c == "kept":
            return f"{v:.1%}"
        return round(v, 1) if c == "s/epoch" else round(v, 3) if c in ("params_M", "GFLOPs") else v

    table = format_table(cols, [[cell(r, c) for c in cols] for r in rows], markdown=True)
    text = (f"{a.model} at {a.imgsz} on the synthetic set ({a.synth_train}/{a.synth_val}); base {a.epochs} epochs, "
            f"fine-tunes {a.finetune_epochs} epochs, QAT {a.qat_epochs} epochs\n\n{table}\n\n"
            f"teacher run better than plain for every method and seed: {ranking}\n")
    print(text)
    write_text(out / "summary.md", text)
    write_json(out / "summary.json", summary)


if __name__ == "__main__":
    main()
