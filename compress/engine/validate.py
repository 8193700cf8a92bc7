"""Validation (NMS + COCO-equivalent and YOLOv5 val.py-equivalent mAP) and adaptive BatchNorm recalibration."""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm import tqdm

from ..data.augment import scale_boxes
from ..tables import format_table
from .metrics import DetectionMetrics, non_max_suppression, xywh2xyxy

METRICS = ("coco", "ultralytics")  # the two definitions every evaluation computes; see select_metric


def torch_predictor(model, device="cpu", half=False):
    """A predict function for :func:`evaluate`: float images (B,3,H,W) in [0,1] -> decoded predictions."""
    model = model.to(device).eval()

    @torch.no_grad()
    def predict(x):
        x = x.to(device)
        return model(x.half() if half else x)[0].float()

    return predict


def evaluate(predict, batches, nc: int, names=None, conf_thres=0.001, iou_thres=0.6, max_det=300,
             desc="val", progress=True, keep_records=False) -> dict:
    """Run ``predict`` over ``batches`` and compute P, R, mAP@0.5 and mAP@0.5:0.95 by both definitions.

    ``predict`` maps uint8-derived float images to decoded predictions (B, anchors, 5 + nc);
    ``batches`` is any iterable of ``(imgs, targets, paths, shapes)`` as the val loader yields (a loader,
    rectangular batches of any shape included, or a list of cached batches). Boxes are compared in
    original image coordinates. Returns the metrics dict of :meth:`DetectionMetrics.compute`: the COCO
    metrics at the top level and YOLOv5 val.py's under ``"ultralytics"`` (see :func:`select_metric`),
    with ``records`` for COCO JSON when ``keep_records``. To reproduce val.py's numbers feed a loader
    built with ``rect=True, pad=0.5`` and val.py's batch size, ``conf_thres=0.001``, ``iou_thres=0.6``.
    """
    metrics = DetectionMetrics(nc, names, keep_records=keep_records)
    total = len(batches) if hasattr(batches, "__len__") else None
    it = tqdm(batches, desc=f"{desc:>10}", total=total, leave=False, disable=not progress, dynamic_ncols=True)
    for imgs, targets, paths, shapes in it:
        x = imgs.float() / 255
        preds = predict(x)
        h, w = x.shape[2:]
        dets = non_max_suppression(preds, conf_thres, iou_thres, multi_label=True, max_det=max_det)
        for si, det in enumerate(dets):
            t = targets[targets[:, 0] == si]
            gt_boxes = xywh2xyxy(t[:, 2:6] * torch.tensor([w, h, w, h], dtype=t.dtype))
            det = det.clone()
            shape0 = (h, w)
            if shapes is not None and shapes[si] is not None:
                shape0, ratio_pad = shapes[si]
                scale_boxes((h, w), det[:, :4], shape0, ratio_pad)
                scale_boxes((h, w), gt_boxes, shape0, ratio_pad)
            metrics.update(det.cpu(), gt_boxes.cpu(), t[:, 1].cpu(), image_id=metrics.seen,
                           file_name=str(paths[si]), height=int(shape0[0]), width=int(shape0[1]))
    res = metrics.compute()
    if keep_records:
        res["records"] = metrics.records
    return res


def select_metric(results: dict, metric: str = "coco") -> dict:
    """The metrics of one definition from :func:`evaluate`'s dict: ``"coco"`` (pycocotools-equivalent, the
    top-level keys) or ``"ultralytics"`` (YOLOv5 val.py-equivalent). Both have the same keys
    (``precision``, ``recall``, ``map50``, ``map``, ``f1_conf``, ``images``, ``instances``, ``maps``,
    ``per_class``), so :func:`metrics_table` and ``fitness`` take either."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    if metric == "ultralytics":
        return results["ultralytics"]
    return {k: v for k, v in results.items() if k not in ("ultralytics", "records")}


def metrics_table(results: dict) -> str:
    """The per-class + overall metrics table ultralytics users know (P, R, mAP50, mAP50-95).

    ``results``: :func:`evaluate`'s dict (COCO numbers) or :func:`select_metric` of it."""
    rows = [["all", results.get("images", ""), results.get("instances", ""), f"{results['precision']:.3f}",
             f"{results['recall']:.3f}", f"{results['map50']:.3f}", f"{results['map']:.3f}"]]
    for c in results.get("per_class", []):
        rows.append([c["name"], c["images"], c["instances"], f"{c['precision']:.3f}", f"{c['recall']:.3f}",
                     f"{c['map50']:.3f}", f"{c['map']:.3f}"])
    return format_table(["class", "images", "instances", "P", "R", "mAP50", "mAP50-95"], rows)


@torch.no_grad()
def adaptive_bn(model, batches, device="cpu", progress=False) -> None:
    """Adaptive BatchNorm recalibration (EagleEye): re-estimate every BN's running statistics.

    Running statistics are reset and re-estimated as a cumulative average over ``batches`` (uint8
    images as the loaders yield, or ``(imgs, ...)`` tuples) in train mode without gradients; weights do
    not change. The model is left in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the given batches
    model.train()
    try:
        for b in tqdm(batches, desc="adaptive BN", leave=False, disable=not progress):
            imgs = b[0] if isinstance(b, (tuple, list)) else b
            model(imgs.to(device).float() / 255 if imgs.dtype == torch.uint8 else imgs.to(device))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def load_batches(img_files, imgsz: int, batch: int, n_batches: int | None, nc: int, seed: int = 0,
                 shuffle: bool = True, workers: int = 0, prefix: str = "") -> list:
    """Load up to ``n_batches`` letterboxed, unaugmented batches once, to reuse many times.

    Used where many models must see exactly the same images (adaptive BN over hundreds of candidates,
    calibration, a fixed validation subset): no reloading, no augmentation randomness. ``shuffle``
    picks a seed-determined subset instead of the first files.
    """
    from ..data.dataset import create_dataloader

    loader, _ = create_dataloader(img_files, imgsz, batch, augment=False, workers=workers, shuffle=shuffle,
                                  seed=seed, nc=nc, prefix=prefix)
    out = []
    for b in loader:
        out.append(b)
        if n_batches is not None and len(out) >= n_batches:
            break
    return out


def evaluate_model(model, batches, data: dict, device="cpu", **kw) -> dict:
    """:func:`evaluate` a torch model on ``batches`` with the dataset's classes (no progress bar by default)."""
    kw.setdefault("progress", False)
    return evaluate(torch_predictor(model, device), batches, data["nc"], data["names"], **kw)
