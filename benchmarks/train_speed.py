"""Training and validation throughput (images/s) on this CPU, yolov5n and yolov5s.

    python benchmarks/train_speed.py --imgsz 320 --batch 16 --steps 6 --threads 2

Batches come from the synthetic dataset through the real train loader (mosaic etc.) and are loaded
before timing, so the figures are the model's compute: forward + YOLOv5 loss + backward + optimizer step
for training, forward + NMS + mAP bookkeeping for validation (the same code `compress train` / `val` run).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.data.dataset import create_dataloader, load_data_yaml, load_hyp  # noqa: E402
from compress.data.synth import make_synthetic_dataset  # noqa: E402
from compress.engine.loss import ComputeLoss, scale_hyp_for_model  # noqa: E402
from compress.engine.trainer import make_optimizer, param_groups  # noqa: E402
from compress.engine.validate import evaluate, load_batches, torch_predictor  # noqa: E402
from compress.model.artifact import load_model  # noqa: E402
from compress.tables import format_table  # noqa: E402


def train_speed(model, batches, hyp, imgsz):
    """Images/s of full training steps over ``batches`` (after one warm-up step)."""
    model.train()
    loss_fn = ComputeLoss(model, scale_hyp_for_model(hyp, 3, model.nc, imgsz))
    opt = make_optimizer("SGD", param_groups(model, hyp["weight_decay"]), hyp)

    def step(imgs, targets):
        loss, _ = loss_fn(model(imgs.float() / 255), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(*batches[0][:2])
    t = time.perf_counter()
    for imgs, targets, *_ in batches:
        step(imgs, targets)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - t)


def val_speed(model, batches, nc):
    """Images/s of validation (eval forward + NMS + metrics) over ``batches``."""
    evaluate(torch_predictor(model), batches[:1], nc, progress=False)
    t = time.perf_counter()
    evaluate(torch_predictor(model), batches, nc, progress=False)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov5s"])
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed batches per measurement")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as td:
        data = load_data_yaml(make_synthetic_dataset(td, n_train=a.batch * (a.steps + 1), n_val=a.batch * a.steps,
                                                     imgsz=a.imgsz, classes=4))
        hyp = load_hyp()
        loader, _ = create_dataloader(data["train"], a.imgsz, a.batch, augment=True, hyp=hyp, shuffle=True)
        train_batches = [b for _, b in zip(range(a.steps + 1), loader)]
        val_batches = load_batches(data["val"], a.imgsz, a.batch, a.steps, data["nc"], shuffle=False)
        rows = []
        for name in a.models:
            model = load_model(f"{name}.yaml", nc=data["nc"])
            tr = train_speed(model, train_batches, hyp, a.imgsz)
            model = load_model(f"{name}.yaml", nc=data["nc"])  # untrained: the NMS worst case
            va = val_speed(model, val_batches, data["nc"])
            rows.append([name, a.imgsz, a.batch, f"{tr:.1f}", f"{va:.1f}"])
    print(f"CPU, {a.threads} torch threads, {a.steps} timed batches")
    print(format_table(["model", "imgsz", "batch", "train img/s", "val img/s"], rows))


if __name__ == "__main__":
    main()
