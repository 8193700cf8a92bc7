"""QAT with MQBench: accuracy of float, PTQ, QAT (fake-quant) and the int8 ONNX, step-time cost, latency.

    python benchmarks/qat.py --weights runs/train/exp runs/eagleeye/exp-ft --data data.yaml \
        --backend Tensorrt --epochs 5 --imgsz 320 --out runs/bench/qat

For each artifact it runs the same function as `compress qat` (prepare, calibrate, fine-tune with the
trainer, deploy, onnxruntime checks), reusing a finished run in --out, then prints one table: mAP@0.5 and
mAP@0.5:0.95 of float / PTQ / QAT fake-quant / int8 Q/DQ ONNX in onnxruntime, the Q/DQ-vs-torch max abs
difference, and onnxruntime latency of the float ONNX and of the Q/DQ ONNX. It also times a QAT training
step against a float step on the same batches, side by side (--step-backends).
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.data.dataset import create_dataloader, load_data_yaml, load_hyp  # noqa: E402
from compress.engine.loss import ComputeLoss, scale_hyp_for_model  # noqa: E402
from compress.engine.trainer import make_optimizer, param_groups  # noqa: E402
from compress.export import compare_latency, onnx_latency  # noqa: E402
from compress.model.artifact import load_model  # noqa: E402
from compress.quant import calibrate, mark_no_decay, prepare_qat  # noqa: E402
from compress.stages.qat import QATOptions, run as run_qat  # noqa: E402
from compress.tables import format_table  # noqa: E402


def step_times(model, batches, hyp, imgsz, repeats=3):
    """Median seconds of one training step (forward, loss, backward, SGD step) over ``batches``."""
    model.train()
    loss_fn = ComputeLoss(model, scale_hyp_for_model(hyp, 3, model.nc, imgsz))
    opt = make_optimizer("SGD", param_groups(model, hyp["weight_decay"]), {**hyp, "lr0": 1e-4})
    times = []
    for r in range(repeats + 1):
        for imgs, targets, *_ in batches:
            t = time.perf_counter()
            loss, _ = loss_fn(model(imgs.float() / 255), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if r:  # the first round warms up
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="+", required=True, help="trained artifacts (e.g. base and pruned)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--backend", default="Tensorrt")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib-batches", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--step-backends", nargs="*", default=["Tensorrt", "NNIE"],
                    help="backends whose QAT step time is compared with a float step")
    ap.add_argument("--step-batch", type=int, default=8)
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads for latency")
    ap.add_argument("--out", default="runs/bench/qat")
    a = ap.parse_args()
    out = Path(a.out)
    rows = []
    for i, w in enumerate(a.weights):
        run = out / f"{i}-{Path(w).name}-{a.backend}"
        rep_file = run / "report.json"
        rep = json.loads(rep_file.read_text()) if rep_file.is_file() else {}
        if rep.get("stage") != "qat":
            if run.exists():
                shutil.rmtree(run)
            rep = run_qat(QATOptions(data=a.data, weights=str(w), epochs=a.epochs, imgsz=a.imgsz, batch=a.batch,
                                     workers=a.workers, out=str(run), progress=False, backend=a.backend,
                                     calib_batches=a.calib_batches, lr=a.lr)).to_dict()
        float_lat = compare_latency({"float": load_model(w)}, a.imgsz, runs=a.latency_runs, threads=a.threads)[0]
        q = rep.get("deploy", {}).get("qdq_onnx")
        q_lat = onnx_latency(q, a.imgsz, runs=a.latency_runs, threads=a.threads)["median_ms"] if q else None

        def f(v, fmt=".3f"):
            return "" if v is None else format(v, fmt)

        rows.append([str(w), f(rep["float_map50"]), f(rep["float_map"]), f(rep["qat"]["ptq_map50"]),
                     f(rep["qat"]["ptq_map"]), f(rep["qat_map50"]), f(rep["qat_map"]), f(rep.get("int8_map50")),
                     f(rep.get("int8_map")), f(rep.get("qdq_max_abs_diff"), ".3g"), f(float_lat["median_ms"], ".1f"),
                     f(q_lat, ".1f")])
    print(f"\nQAT ({a.backend}, {a.epochs} epochs, {a.imgsz}px); latency: onnxruntime CPU, {a.threads} threads")
    print(format_table(["model", "float mAP50", "float mAP", "PTQ mAP50", "PTQ mAP", "QAT mAP50", "QAT mAP",
                        "int8 ONNX mAP50", "int8 ONNX mAP", "Q/DQ max diff px", "float ms", "int8 ms"], rows))

    if a.step_backends:
        data = load_data_yaml(a.data)
        hyp = load_hyp()
        loader, _ = create_dataloader(data["train"], a.imgsz, a.step_batch, augment=True, hyp=hyp, shuffle=True)
        batches = [b for _, b in zip(range(3), loader)]
        float_model = load_model(a.weights[0])
        t_float = step_times(load_model(a.weights[0]), batches, hyp, a.imgsz)
        srows = [["float", f"{t_float:.3f}", "1.00"]]
        for b in a.step_backends:
            p = prepare_qat(float_model, b)
            calibrate(p, batches)
            mark_no_decay(p)
            t = step_times(p, batches, hyp, a.imgsz)
            srows.append([f"QAT {b}", f"{t:.3f}", f"{t / t_float:.2f}"])
        print(f"\ntraining step, batch {a.step_batch} at {a.imgsz}px, {torch.get_num_threads()} torch threads "
              f"(median of {3 * len(batches)} steps)")
        print(format_table(["model", "s/step", "ratio to float"], srows))


if __name__ == "__main__":
    main()
