"""Oracle check: compress's evaluation (ultralytics metric, rect batches) against YOLOv5's own val.py.

    python benchmarks/val_vs_ultralytics.py --yolov5 PATH/TO/yolov5 [--weights ARTIFACT --cfg yolov5n]
        [--data DATA.yaml] [--imgsz 256] [--batch 32] [--mixed-aspect] [--extra-path DIR] [--out DIR]

``--yolov5`` is a checkout of a standalone YOLOv5 release (tested: v7.0, ``git archive v7.0``; later
master imports the ``ultralytics`` package instead of its own utils). Without it the script says so and
exits 0. val.py runs in a child process of this interpreter with ``--yolov5`` and ``--extra-path`` on
PYTHONPATH; it needs pandas, seaborn, requests and psutil there (e.g. ``pip install --target DIR --no-deps
pandas seaborn requests urllib3 idna certifi charset-normalizer psutil`` and ``--extra-path DIR``).
torchvision, IPython and pkg_resources are replaced by small stubs (``OUT/stubs``) when they are absent:
val.py needs only ``torchvision.ops.nms``, done here by a plain greedy loop.

The same weights go to both sides: the compress artifact (``--weights``, unpruned, built from the
ultralytics YAML ``--cfg``) is loaded into ultralytics' own ``models.yolo.Model`` (the state_dict keys are
the same by design), saved as an ultralytics checkpoint and run by ``val.run(weights=...)`` as the val.py
command line would (conf 0.001, NMS IoU 0.6, max_det 300, fp32, rect batches, pad 0.5). Without
``--weights`` a synthetic set is made and yolov5n trained ``--epochs`` epochs on it (minutes on CPU).
``--mixed-aspect`` replaces the val split by crops of it with mixed aspect ratios and odd sizes, so that
the rect batches differ from square and some paddings are odd.

Rows of the table (``OUT/summary.md``, ``OUT/summary.json``):

- ``val.py``: what val.py prints (its loader, model, NMS and metric);
- ``compress metric on val.py detections``: val.py's own native-space detections (from its
  ``on_val_image_end`` callback) scored by :class:`DetectionMetrics` against the label files: isolates
  the metric (expected equal to val.py to float rounding);
- ``compress --metric ultralytics --rect``: compress's loader (rect, pad 0.5), model and NMS, ultralytics
  metric: the whole pipeline (the target: within 0.002 of val.py);
- ``compress --metric coco --rect`` and the square loader: for reference.

Measured (yolov5n trained 30 epochs at 256 on the synthetic set, 64 val images, YOLOv5 v7.0, CPU): square
256-px images (rect batches 288 x 288) give val.py's P, R, mAP@0.5 and mAP@0.5:0.95 exactly;
``--mixed-aspect`` gives mAP@0.5 exactly and mAP@0.5:0.95 +0.0003 (batch 32) / +0.0008 (batch 16). That
residual is val.py's mapping back to the image (half-pixel pads, the height gain for both axes), which
compress does not copy: emulating it on compress's pipeline reproduces val.py to 1e-6.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from compress.data.augment import xywhn2xyxy
from compress.data.dataset import create_dataloader, img2label_paths, load_data_yaml
from compress.data.synth import make_synthetic_dataset
from compress.engine.metrics import DetectionMetrics, fitness
from compress.engine.trainer import TrainOptions, train
from compress.engine.validate import evaluate, select_metric, torch_predictor
from compress.fileio import write_json, write_text
from compress.model.artifact import load_model, read_report
from compress.tables import format_table

TOLERANCE = 0.002

STUBS = {
    "torchvision": {
        "__init__.py": "from . import datasets, ops, transforms  # noqa: F401\n__version__ = '0.0.0+stub'\n",
        "ops.py": '''"""torchvision.ops.nms as a plain greedy loop (what YOLOv5's non_max_suppression calls)."""
import torch


def box_iou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(2)
    return inter / (area_a[:, None] + area_b[None] - inter)


def nms(boxes, scores, iou_threshold):
    order = scores.argsort(descending=True)
    boxes = boxes[order].float()
    dropped = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if dropped[i]:
            continue
        keep.append(i)
        dropped[i + 1:] |= box_iou(boxes[i:i + 1], boxes[i + 1:])[0] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]
''',
        "datasets.py": "class ImageFolder:  # base of YOLOv5's classification dataset, unused here\n    pass\n",
        "transforms/__init__.py": "from . import functional  # noqa: F401\n",
        "transforms/functional.py": "",
    },
    "IPython": {"__init__.py": "def get_ipython():\n    return None\n",
                "display.py": "def display(*args, **kwargs):\n    pass\n"},
    "pkg_resources": {"__init__.py": '''from packaging.version import parse as parse_version  # noqa: F401


class VersionConflict(Exception):
    pass


class DistributionNotFound(Exception):
    pass


def require(*args):
    return []


def parse_requirements(*args):
    return []
'''},
}

# Runs inside the val.py environment: argv = yolov5 cfg, compress weights.pt, data.yaml, imgsz, batch, out.
CHILD = '''
import json, sys, time
import numpy as np
import torch
if not hasattr(np, "trapz"):
    np.trapz = np.trapezoid  # YOLOv5 v7.0 on numpy >= 2.4
_load = torch.load
torch.load = lambda *a, **k: _load(*a, **{"weights_only": False, **k})  # our own pickled Model below
import utils.general
import val
from models.yolo import Model
from utils.callbacks import Callbacks

utils.general.check_font = lambda *a, **k: None  # a plotting font download; no network needed or wanted


class _FrozenClock:  # non_max_suppression gives up after 0.5 + 0.05 * batch s: never on GPUs, often here
    time = staticmethod(lambda: 0.0)

    def __getattr__(self, name):
        return getattr(time, name)


utils.general.time = _FrozenClock()

cfg, weights, data, imgsz, batch, out = sys.argv[1:]
names = json.loads(open(out + "/names.json").read())
model = Model(cfg, nc=len(names))
model.load_state_dict(_load(weights, map_location="cpu", weights_only=True), strict=True)
model.nc, model.names = len(names), names  # as train.py attaches them
torch.save({"model": model, "epoch": -1}, out + "/ultralytics_model.pt")
dets, pending = {}, []
_process_batch = val.process_batch


def _process_batch_recorded(detections, labels, iouv):  # called just before on_val_image_end, if labels
    pending.append(labels.tolist())
    return _process_batch(detections, labels, iouv)


def _on_image(pred, predn, path, names, im):
    dets[str(path)] = {"pred": predn.tolist(), "labels": pending.pop() if pending else None,
                       "input_hw": list(im.shape[1:])}


val.process_batch = _process_batch_recorded
cb = Callbacks()
cb.register_action("on_val_image_end", callback=_on_image)
(mp, mr, map50, map_, *_), maps, _ = val.run(
    data=data, weights=out + "/ultralytics_model.pt", imgsz=int(imgsz), batch_size=int(batch), conf_thres=0.001,
    iou_thres=0.6, max_det=300, device="cpu", workers=0, half=False, plots=False, project=out, name="val",
    exist_ok=True, callbacks=cb)
json.dump({"precision": float(mp), "recall": float(mr), "map50": float(map50), "map": float(map_),
           "maps": [float(v) for v in maps], "detections": dets}, open(out + "/val_py.json", "w"))
'''


def write_stubs(out: Path) -> Path:
    """Stub packages for the modules val.py imports but this environment lacks; returns their folder."""
    root = out / "stubs"
    for name, files in STUBS.items():
        if importlib.util.find_spec(name) is not None:
            continue
        for rel, text in files.items():
            f = root / name / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
    return root


def absolute_data_yaml(data_yaml: Path, out: Path) -> Path:
    """A copy of ``data_yaml`` with absolute paths (val.py resolves a relative ``path`` against its own repo)."""
    d = load_data_yaml(data_yaml)
    list_file = out / "val_images.txt"
    list_file.write_text("".join(f"{f}\n" for f in d["val"]))
    y = out / "data_abs.yaml"
    y.write_text(yaml.safe_dump({"path": str(out), "train": str(list_file), "val": str(list_file),
                                 "nc": d["nc"], "names": d["names"]}))
    return y


def _area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def make_mixed_aspect(data_yaml: Path, out: Path) -> Path:
    """A val split of crops/resizes of ``data_yaml``'s val images with mixed aspect ratios and odd sizes.

    Labels are moved with the crop; boxes keeping less than 60 % of their area are dropped (the object may
    then show unlabelled at an edge, the same for both evaluations). Returns the new data.yaml.
    """
    d = load_data_yaml(data_yaml)
    (out / "images" / "val").mkdir(parents=True, exist_ok=True)
    (out / "labels" / "val").mkdir(parents=True, exist_ok=True)
    # (scale, crop w fraction, crop h fraction): square, wide, tall, enlarged odd crop, 3:2 odd, odd resize
    variants = [(1.0, 1.0, 1.0), (1.0, 1.0, 0.5), (1.0, 0.5, 1.0), (1.5, 1.0, 0.56), (1.0, 1.0, 0.668),
                (1.17, 1.0, 0.66)]
    rng = np.random.default_rng(0)
    for k, (im_file, lb_file) in enumerate(zip(d["val"], img2label_paths(d["val"]))):
        im = cv2.imread(im_file)
        s, fw, fh = variants[k % len(variants)]
        if s != 1.0:
            im = cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)), interpolation=cv2.INTER_LINEAR)
        h, w = im.shape[:2]
        cw, ch = max(int(w * fw), 16), max(int(h * fh), 16)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        lab = np.loadtxt(lb_file, ndmin=2).reshape(-1, 5) if Path(lb_file).is_file() else np.zeros((0, 5))
        boxes = xywhn2xyxy(lab[:, 1:], w, h) - [x0, y0, x0, y0]
        clipped = boxes.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, cw)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, ch)
        keep = _area(clipped) >= 0.6 * _area(boxes)
        name = Path(im_file).stem + ".png"
        cv2.imwrite(str(out / "images" / "val" / name), im[y0:y0 + ch, x0:x0 + cw])
        lines = [f"{int(c)} {(b[0] + b[2]) / 2 / cw:.6f} {(b[1] + b[3]) / 2 / ch:.6f} {(b[2] - b[0]) / cw:.6f} "
                 f"{(b[3] - b[1]) / ch:.6f}\n" for c, b in zip(lab[keep, 0], clipped[keep])]
        (out / "labels" / "val" / (Path(im_file).stem + ".txt")).write_text("".join(lines))
    y = out / "data.yaml"
    y.write_text(yaml.safe_dump({"path": str(out), "train": "images/val", "val": "images/val", "nc": d["nc"],
                                 "names": d["names"]}))
    return y


def run_val_py(a, weights_file: Path, data_abs: Path, names, out: Path) -> dict:
    """val.py on the same weights and images in a child process; its results and detections."""
    (out / "names.json").write_text(json.dumps(list(names)))
    (out / "child.py").write_text(CHILD)
    paths = [str(a.yolov5), *(str(p) for p in a.extra_path), str(write_stubs(out))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])}
    cfg = Path(a.cfg) if Path(a.cfg).is_file() else a.yolov5 / "models" / f"{a.cfg}.yaml"
    cmd = [sys.executable, str(out / "child.py"), str(cfg), str(weights_file), str(data_abs), str(a.imgsz),
           str(a.batch), str(out)]
    p = subprocess.run(cmd, cwd=a.yolov5, env=env, capture_output=True, text=True)
    log = p.stdout + p.stderr
    write_text(out / "val_py.log", log)
    if p.returncode:
        raise SystemExit(f"val.py failed (log: {out / 'val_py.log'}):\n{log[-3000:]}")
    if "NMS time limit" in log:
        raise SystemExit(f"val.py hit its NMS time limit, its numbers are truncated (log: {out / 'val_py.log'})")
    return json.loads((out / "val_py.json").read_text())


def score_detections(dets: dict, data: dict) -> dict:
    """:class:`DetectionMetrics` on val.py's detections and labels, both in its "native" space.

    val.py maps labels and detections back with one gain (h / h0) for both axes and its fractional pads,
    so its native space is not quite the image's; the label files serve only for images without
    detections (where only their count matters). Images in val.py's order.
    """
    m = DetectionMetrics(data["nc"], data["names"])
    files = dict(zip(data["val"], img2label_paths(data["val"])))
    position = {f: i for i, f in enumerate(dets)}
    for f in sorted(files, key=lambda f: position.get(f, len(position))):
        lab = np.loadtxt(files[f], ndmin=2).reshape(-1, 5) if Path(files[f]).is_file() else np.zeros((0, 5))
        d = dets.get(f, {"pred": [], "labels": None})
        if d["labels"] is not None:
            lab = np.array(d["labels"], np.float64).reshape(-1, 5)
        else:
            h, w = cv2.imread(f).shape[:2]
            lab[:, 1:] = xywhn2xyxy(lab[:, 1:], w, h)
        m.update(np.array(d["pred"], np.float64).reshape(-1, 6), lab[:, 1:], lab[:, 0])
    return m.compute()


def compress_eval(model, data: dict, a, rect: bool) -> tuple[dict, dict]:
    """compress's evaluation of ``model`` on the val split (square or rect batches), and the input
    (h, w) of each image."""
    stride = int(max(model.stride.tolist()))
    loader, ds = create_dataloader(data["val"], a.imgsz, a.batch, augment=False, nc=data["nc"], rect=rect,
                                   pad=0.5 if rect else 0.0, stride=stride)
    res = evaluate(torch_predictor(model), loader, data["nc"], data["names"], 0.001, 0.6, 300, progress=False)
    hw = {f: [int(v) for v in ds.batch_shapes[ds.batch_index[i]]] if rect else [a.imgsz] * 2
          for i, f in enumerate(ds.im_files)}
    return res, hw


def train_default(a, out: Path) -> Path:
    """yolov5n trained ``--epochs`` on the default synthetic set (reused when already there)."""
    run = out / "train"
    if "final_epoch" not in read_report(run):
        train(TrainOptions(data=str(a.data), cfg="yolov5n", epochs=a.epochs, imgsz=a.imgsz, batch=16,
                           optimizer="AdamW", hyp="adamw-fast", nbs=16, workers=0, out=str(run), progress=False,
                           val_interval=a.epochs))
    return run


def row(name, r):
    """A table row: name, P, R, mAP@0.5, mAP@0.5:0.95."""
    return [name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['map50']:.4f}", f"{r['map']:.4f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--yolov5", type=Path, help="YOLOv5 release checkout (with val.py), e.g. v7.0")
    ap.add_argument("--weights", help="compress artifact (unpruned); default: train yolov5n on synthetic data")
    ap.add_argument("--cfg", default="yolov5n", help="ultralytics model YAML of --weights (name in yolov5/models or path)")
    ap.add_argument("--data", type=Path, help="data.yaml (default: a synthetic set made in --out)")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="val batch size (val.py's default 32; rect shapes depend on it)")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs without --weights")
    ap.add_argument("--mixed-aspect", action="store_true", help="validate on mixed-aspect crops of the val split")
    ap.add_argument("--extra-path", type=Path, nargs="*", default=[], help="folders with val.py's extra packages")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/val_vs_ultralytics"))
    a = ap.parse_args(argv)
    if a.yolov5 is None or not (a.yolov5 / "val.py").is_file():
        print(f"skipped: no YOLOv5 checkout with val.py at --yolov5 {a.yolov5} (e.g. git clone "
              "https://github.com/ultralytics/yolov5 && git -C yolov5 checkout v7.0)")
        return 0
    a.yolov5 = a.yolov5.resolve()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.data is None:
        a.data = out / "synth" / "data.yaml"
        if not a.data.is_file():
            make_synthetic_dataset(out / "synth", n_train=256, n_val=64, imgsz=a.imgsz, classes=4, seed=0)
    weights = Path(a.weights) if a.weights else train_default(a, out)
    if a.mixed_aspect:
        a.data = make_mixed_aspect(a.data, out / "mixed")
    data = load_data_yaml(a.data)
    model = load_model(weights).eval()
    weights_file = weights / "weights.pt" if weights.is_dir() else weights

    ul = run_val_py(a, weights_file, absolute_data_yaml(a.data, out), data["names"], out)
    dets = ul.pop("detections")
    on_ul_dets = score_detections(dets, data)
    rect, rect_hw = compress_eval(model, data, a, rect=True)
    square, _ = compress_eval(model, data, a, rect=False)
    same_input = sum(rect_hw[f] == d["input_hw"] for f, d in dets.items())
    rows = [row("val.py", ul),
            row("compress metric on val.py detections", select_metric(on_ul_dets, "ultralytics")),
            row("compress --metric ultralytics --rect", select_metric(rect, "ultralytics")),
            row("compress --metric coco --rect", select_metric(rect, "coco")),
            row("compress --metric ultralytics (square)", select_metric(square, "ultralytics")),
            row("compress --metric coco (square)", select_metric(square, "coco"))]
    table = format_table(["evaluation", "P", "R", "mAP@0.5", "mAP@0.5:0.95"], rows, markdown=True)
    ours = rect["ultralytics"]
    delta = {k: ours[k] - ul[k] for k in ("precision", "recall", "map50", "map")}
    ok = abs(delta["map50"]) <= TOLERANCE and abs(delta["map"]) <= TOLERANCE
    summary = (f"{table}\n\n{len(data['val'])} images, imgsz {a.imgsz}, batch {a.batch}, weights {weights}, "
               f"yolov5 {a.yolov5}\nrect input shape as val.py's: {same_input} of the {len(dets)} images "
               f"val.py detected something in; batch shapes {sorted({tuple(v) for v in rect_hw.values()})}\n"
               "compress --metric ultralytics --rect minus val.py: "
               + ", ".join(f"{k} {v:+.5f}" for k, v in delta.items())
               + f" -> {'within' if ok else 'OUTSIDE'} {TOLERANCE} on mAP; fitness {fitness(ours):.4f} vs "
               f"{0.1 * ul['map50'] + 0.9 * ul['map']:.4f}\n")
    print(summary)
    write_text(out / "summary.md", summary)
    write_json(out / "summary.json", {"val_py": ul, "compress_metric_on_val_py_detections": on_ul_dets,
                                      "compress_rect": rect, "compress_square": square, "delta": delta,
                                      "within_tolerance": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    sys.exit(main())
