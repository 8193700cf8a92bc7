"""Boxes, IoU, NMS and detection metrics (plain torch / numpy, no torchvision).

Box conventions: ``xyxy`` is (x1, y1, x2, y2), ``xywh`` is (center x, center y, w, h), both in pixels;
areas are ``w * h`` with no "+1" (as COCO computes them).

:class:`DetectionMetrics` computes two metrics from the same accumulated detections, every time:

- COCO: reproduces pycocotools' ``COCOeval`` (iouType 'bbox', IoU thresholds 0.50:0.95, 101 recall
  points, area 'all'): per threshold, detections in score order take the best unmatched GT; AP is the
  mean of the precision envelope sampled at 101 recall points.
- ultralytics: reproduces YOLOv5 ``val.py`` (``process_batch`` + ``ap_per_class`` / ``compute_ap``):
  per threshold, each detection picks its highest-IoU GT and a GT keeps the first (most confident)
  detection that picked it (:func:`match_detections_ultralytics`); AP integrates the envelope of the
  padded precision/recall curve by the trapezoid rule over 101 points (:func:`ap_trapezoid`).

:func:`to_coco_json` writes the same data as COCO files for pycocotools or other tools.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..fileio import write_text

# Offset added per class so that one NMS call never suppresses across classes (ultralytics' max_wh).
MAX_WH = 7680
# COCOeval's parameters, computed the same way so that floating-point comparisons agree exactly.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


# --------------------------------------------------------------------------- box helpers


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return np.array(x, dtype=x.dtype if x.dtype.kind == "f" else np.float64)


def xywh2xyxy(x):
    """(..., 4) center-x, center-y, w, h -> x1, y1, x2, y2 (torch tensor or numpy array; a copy)."""
    y = _clone(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x):
    """(..., 4) x1, y1, x2, y2 -> center-x, center-y, w, h (torch tensor or numpy array; a copy)."""
    y = _clone(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def box_iou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M). Degenerate (empty) pairs give 0."""
    lt = torch.max(box1[:, None, :2], box2[None, :, :2])
    rb = torch.min(box1[:, None, 2:], box2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area1 = (box1[:, 2] - box1[:, 0]) * (box1[:, 3] - box1[:, 1])
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1])
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def bbox_iou(box1, box2, xywh: bool = True, CIoU: bool = False, GIoU: bool = False, DIoU: bool = False,
             eps: float = 1e-7) -> torch.Tensor:
    """Elementwise (broadcast) IoU of ``box1`` and ``box2``, each (..., 4); returns the broadcast shape
    without the last dim.

    ``xywh`` selects the box format (else xyxy). With ``CIoU`` / ``DIoU`` / ``GIoU`` returns that variant:
    DIoU = IoU - rho^2 / c^2 (rho: center distance, c: diagonal of the enclosing box),
    CIoU = DIoU - alpha * v with v = 4 / pi^2 * (atan(w2 / h2) - atan(w1 / h1))^2 and
    alpha = v / (v - IoU + 1) (alpha carries no gradient, as in YOLOv5),
    GIoU = IoU - (C - union) / C with C the enclosing box area.
    """
    if xywh:
        (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
        b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
        b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    else:
        b1_x1, b1_y1, b1_x2, b1_y2 = box1.unbind(-1)
        b2_x1, b2_y1, b2_x2, b2_y2 = box2.unbind(-1)
        w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1
        w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1
    h1, h2 = h1.clamp(min=eps), h2.clamp(min=eps)  # atan(w / h) needs h > 0

    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(min=0) * \
            (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (CIoU or DIoU or GIoU):
        return iou
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)  # enclosing box
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    if GIoU and not (CIoU or DIoU):
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    if DIoU and not CIoU:
        return iou - rho2 / c2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():  # clamped: rounding can put the IoU of two equal boxes a hair above 1 (0 / 0)
        alpha = v / (v - iou + (1 + eps)).clamp(min=eps)
    return iou - (rho2 / c2 + v * alpha)


# --------------------------------------------------------------------------- NMS


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float, max_keep: int | None = None,
        block: int = 512) -> torch.Tensor:
    """Greedy NMS: indices of the kept ``boxes`` (N, 4 xyxy), highest ``scores`` first.

    A box is dropped when its IoU with a higher-scoring kept box is > ``iou_thres`` (as torchvision's
    ``nms``). ``max_keep`` stops once that many boxes are kept. Vectorised by blocks of ``block`` boxes in
    score order: a block is first thinned by the boxes kept before it, then its own greedy result is the
    fixed point of "kept = not suppressed by an earlier kept box", reached by iteration (the greedy answer
    is the unique fixed point, and each pass settles at least one more box).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order].float()
    kept_chunks, n_kept = [], 0
    for start in range(0, n, block):
        cur = b[start:start + block]
        alive = torch.ones(cur.shape[0], dtype=torch.bool, device=b.device)
        if n_kept:
            prev = b[torch.cat(kept_chunks)]
            alive = ~(box_iou(prev, cur) > iou_thres).any(0)
        over = torch.triu(box_iou(cur, cur) > iou_thres, diagonal=1) & alive[:, None]  # [i, j]: i may drop j
        keep = alive
        while True:
            new = alive & ~(over & keep[:, None]).any(0)
            if torch.equal(new, keep):
                break
            keep = new
        idx = keep.nonzero().squeeze(1) + start
        kept_chunks.append(idx)
        n_kept += idx.numel()
        if max_keep is not None and n_kept >= max_keep:
            break
    kept = torch.cat(kept_chunks)
    if max_keep is not None:
        kept = kept[:max_keep]
    return order[kept]


def non_max_suppression(prediction, conf_thres: float = 0.001, iou_thres: float = 0.6, classes=None,
                        agnostic: bool = False, multi_label: bool = True, max_det: int = 300,
                        max_nms: int = 30000) -> list[torch.Tensor]:
    """Per-image NMS on decoded YOLOv5 outputs (ultralytics semantics).

    ``prediction``: (B, anchors, 5 + nc) with xywh in pixels, objectness and class scores (sigmoid
    applied), i.e. the eval-mode Detect output; a ``(decoded, raw)`` tuple is accepted too. Candidates
    need objectness > ``conf_thres``; their confidence is obj * class score, and with ``multi_label`` every
    class above ``conf_thres`` yields a box (else only the best class). ``classes`` keeps only those class
    indices. At most ``max_nms`` candidates (by confidence) enter NMS, done per class by offsetting boxes
    by class * MAX_WH (or across classes with ``agnostic``), and ``max_det`` are kept.

    Returns one (n, 6) tensor per image: x1, y1, x2, y2, conf, class — sorted by confidence.
    """
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres and iou_thres must be in [0, 1], got {conf_thres}, {iou_thres}")
    nc = prediction.shape[2] - 5
    multi_label &= nc > 1
    out = [torch.zeros((0, 6), device=prediction.device) for _ in range(prediction.shape[0])]
    for xi, x in enumerate(prediction):
        x = x[x[:, 4] > conf_thres].float()
        if not x.shape[0]:
            continue
        cls_conf = x[:, 5:] * x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (cls_conf > conf_thres).nonzero(as_tuple=False).T
            det = torch.cat((box[i], cls_conf[i, j, None], j[:, None].float()), 1)
        else:
            conf, j = cls_conf.max(1, keepdim=True)
            det = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            det = det[(det[:, 5:6] == torch.tensor(classes, device=det.device, dtype=det.dtype)).any(1)]
        if not det.shape[0]:
            continue
        if det.shape[0] > max_nms:  # keep the most confident (topk: cheaper than sorting millions)
            det = det[det[:, 4].topk(max_nms).indices]
        offset = det[:, 5:6] * (0 if agnostic else MAX_WH)
        keep = nms(det[:, :4] + offset, det[:, 4], iou_thres, max_keep=max_det)
        out[xi] = det[keep]
    return out


# --------------------------------------------------------------------------- COCO-equivalent mAP


def _to_numpy(x, shape_tail, what):
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.size == 0:
        a = a.reshape((0, *shape_tail))
    if a.shape[1:] != shape_tail:
        raise ValueError(f"{what}: expected shape (n, {', '.join(map(str, shape_tail)) or ''}), got {a.shape}")
    return a


def _coco_iou(dt_xyxy, gt_xyxy):
    """IoU exactly as pycocotools' bbIou computes it (float64, from x, y, w, h; w * h areas)."""
    d = np.stack([dt_xyxy[:, 0], dt_xyxy[:, 1], dt_xyxy[:, 2] - dt_xyxy[:, 0], dt_xyxy[:, 3] - dt_xyxy[:, 1]], 1)
    g = np.stack([gt_xyxy[:, 0], gt_xyxy[:, 1], gt_xyxy[:, 2] - gt_xyxy[:, 0], gt_xyxy[:, 3] - gt_xyxy[:, 1]], 1)
    D, G = d[:, None, :], g[None, :, :]
    w = np.minimum(D[..., 2] + D[..., 0], G[..., 2] + G[..., 0]) - np.maximum(D[..., 0], G[..., 0])
    h = np.minimum(D[..., 3] + D[..., 1], G[..., 3] + G[..., 1]) - np.maximum(D[..., 1], G[..., 1])
    inter = w * h
    union = D[..., 2] * D[..., 3] + G[..., 2] * G[..., 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def match_detections(iou: np.ndarray, iou_thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """COCO matching of one image and class: (T, D) bool, True where detection d is a true positive at
    threshold t.

    ``iou`` is (D, G) with detections already sorted by descending score. For each threshold, detections
    in order take the unmatched GT with the highest IoU >= threshold (on an IoU tie the later GT, as
    COCOeval's loop does).
    """
    nd, ng = iou.shape
    thr = np.minimum(np.asarray(iou_thresholds, dtype=np.float64), 1 - 1e-10)
    tp = np.zeros((len(thr), nd), dtype=bool)
    if nd == 0 or ng == 0:
        return tp
    taken = np.zeros((len(thr), ng), dtype=bool)
    for d in np.nonzero(iou.max(1) >= thr.min())[0]:  # the others match nothing at any threshold
        row = iou[d]
        ok = (row[None, :] >= thr[:, None]) & ~taken
        best = ng - 1 - np.argmax(np.where(ok, row, -1.0)[:, ::-1], axis=1)
        hit = ok.any(1)
        tp[hit, d] = True
        taken[hit, best[hit]] = True
    return tp


def match_detections_ultralytics(iou: np.ndarray, det_cls, gt_cls, iou_thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """YOLOv5 val.py matching of one image: (T, D) bool, True where detection d is a true positive at
    threshold t.

    ``iou`` is (D, G) with detections in the image's NMS output order (descending confidence);
    ``det_cls`` (D,) and ``gt_cls`` (G,) are the classes. A (detection, GT) pair is a candidate when the
    classes agree and IoU >= threshold. As val.py's ``process_batch`` resolves the candidates: each
    detection picks its highest-IoU GT (on a tie the later GT), then each GT keeps the first detection
    (lowest index) among those that picked it. A detection whose pick went to an earlier detection is a
    false positive even if another GT was free: this is not COCO's matching, nor a global IoU-greedy one.
    """
    nd, ng = iou.shape
    thr = np.asarray(iou_thresholds, dtype=np.float64)
    tp = np.zeros((len(thr), nd), dtype=bool)
    if nd == 0 or ng == 0:
        return tp
    iou = np.where(np.asarray(det_cls).reshape(-1, 1) == np.asarray(gt_cls).reshape(1, -1), iou, -1.0)
    rows = np.nonzero(iou.max(1) >= thr.min())[0]  # the others match nothing at any threshold
    cand = iou[None, rows] >= thr[:, None, None]  # (T, rows, G)
    best = ng - 1 - np.argmax(np.where(cand, iou[None, rows], -1.0)[..., ::-1], axis=2)  # (T, rows)
    t_idx, r_idx = np.nonzero(cand.any(2))  # by threshold, then by detection index
    _, first = np.unique(t_idx * ng + best[t_idx, r_idx], return_index=True)  # first detection per (t, GT)
    tp[t_idx[first], rows[r_idx[first]]] = True
    return tp


def coco_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCOeval's AP of one precision/recall curve (detections by descending score): the precision
    envelope sampled at the 101 recall thresholds 0, 0.01, ..., 1 (0 beyond the highest recall), averaged."""
    n = len(recall)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    q = np.where(idx < n, envelope[np.minimum(idx, n - 1)], 0.0)
    return q.mean()


def ap_trapezoid(recall: np.ndarray, precision: np.ndarray) -> float:
    """YOLOv5's AP of one precision/recall curve (detections by descending score), as its ``compute_ap``.

    The curve is padded with (recall 0, precision 1) in front and (recall 1, precision 0) at the end,
    replaced by its monotone envelope, linearly interpolated at the 101 recall points 0, 0.01, ..., 1 and
    integrated by the trapezoid rule. Unlike :func:`coco_ap`, the padding adds a ramp from the last
    recall to (1, 0), and the trapezoid weighs the end points by half.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    x = np.linspace(0, 1, 101)
    return float(_trapezoid(np.interp(x, mrec, mpre), x))


def _smooth(y, f=0.05):
    """Box filter over a fraction ``f`` of the points (ultralytics smooths the F1 curve this way)."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(nf // 2)
    return np.convolve(np.concatenate((pad * y[0], y, pad * y[-1])), np.ones(nf) / nf, mode="valid")


class DetectionMetrics:
    """Accumulates per-image detections and ground truth; computes COCO and ultralytics mAP and P/R.

    The COCO metric agrees with pycocotools ``COCOeval`` (bbox, area 'all', ``maxDets[-1] == max_det``) on
    the same data: matching per IoU threshold in score order, 101-point interpolated precision envelope,
    classes without ground truth left out of the means. As in COCOeval, ``max_det`` caps detections per
    image *and class* (by score). No crowd / ignore regions. Score ties are broken by update order (COCO:
    image id order).

    The ultralytics metric reproduces YOLOv5 ``val.py`` on the same data: :func:`match_detections_ultralytics`
    on every detection given (no ``max_det`` cap; val.py's cap is the NMS ``max_det``), AP by
    :func:`ap_trapezoid`, classes without ground truth left out of the means (as val.py, whose classes are
    those of the labels). Detections must come in NMS output order (descending confidence) per image.

    Usage: ``m = DetectionMetrics(nc, names)``; per image ``m.update(pred, gt_boxes, gt_cls)`` with ``pred``
    (n, 6) [x1, y1, x2, y2, conf, cls] (the output of :func:`non_max_suppression`, in the same pixel
    coordinates as the GT), ``gt_boxes`` (m, 4) xyxy and ``gt_cls`` (m,); then ``m.compute()``.
    With ``keep_records=True`` the raw per-image data are kept in ``m.records`` for :func:`to_coco_json`.
    """

    def __init__(self, nc: int, names=None, max_det: int = 100, keep_records: bool = False):
        self.nc = int(nc)
        self.names = list(names) if names is not None else [str(i) for i in range(self.nc)]
        if len(self.names) != self.nc:
            raise ValueError(f"{len(self.names)} names for nc={self.nc} classes")
        self.max_det = int(max_det)
        self.keep_records = keep_records
        self.reset()

    def reset(self):
        """Forget everything accumulated."""
        self._scores, self._cls, self._tp = [], [], []  # COCO: capped at max_det, (T, n) matches
        self._ul_scores, self._ul_cls, self._ul_tp = [], [], []  # ultralytics: every detection
        self.instances = np.zeros(self.nc, dtype=np.int64)  # GT boxes per class
        self.images_per_class = np.zeros(self.nc, dtype=np.int64)  # images holding the class in GT
        self.seen = 0
        self.records = []

    def update(self, pred, gt_boxes, gt_cls, image_id=None, **info):
        """Add one image: ``pred`` (n, 6) xyxy/conf/cls, ``gt_boxes`` (m, 4) xyxy, ``gt_cls`` (m,).

        Tensors (any device) or arrays. ``image_id`` and ``info`` (e.g. file_name, width, height) are only
        stored in ``records`` when ``keep_records`` is on; the id defaults to the update count.
        """
        p = _to_numpy(pred, (6,), "pred")
        g = _to_numpy(gt_boxes, (4,), "gt_boxes")
        gc = np.asarray(gt_cls.detach().cpu() if isinstance(gt_cls, torch.Tensor) else gt_cls).reshape(-1)
        gc = gc.astype(np.int64)
        if len(gc) != len(g):
            raise ValueError(f"{len(g)} gt_boxes but {len(gc)} gt_cls")
        pc = p[:, 5].astype(np.int64)
        for what, c in (("gt_cls", gc), ("pred class", pc)):
            if c.size and (c.min() < 0 or c.max() >= self.nc):
                raise ValueError(f"{what} {int(c.min())}..{int(c.max())} out of range for nc={self.nc}")
        if self.keep_records:
            self.records.append(dict(id=self.seen if image_id is None else image_id, pred=p.astype(np.float32),
                                     gt_boxes=g.copy(), gt_cls=gc.copy(), **info))
        self.seen += 1
        np.add.at(self.instances, gc, 1)
        self.images_per_class[np.unique(gc)] += 1
        self._update_ultralytics(p, pc, g, gc)
        # detections grouped by class, by descending score within a class (stable), at most max_det each
        order = np.lexsort((-p[:, 4], pc))
        p, pc = p[order], pc[order]
        rank = np.arange(len(pc)) - np.searchsorted(pc, pc, side="left")
        p, pc = p[rank < self.max_det], pc[rank < self.max_det]
        tp = np.zeros((len(IOU_THRESHOLDS), len(p)), dtype=bool)
        for c in np.intersect1d(pc, gc):  # only classes with both detections and GT can have matches
            sel = np.nonzero(pc == c)[0]
            tp[:, sel] = match_detections(_coco_iou(p[sel, :4], g[gc == c]))
        self._scores.append(p[:, 4])
        self._cls.append(pc)
        self._tp.append(tp)

    def _update_ultralytics(self, p, pc, g, gc):
        """val.py's matches of one image, on all its detections in the order given."""
        tp = np.zeros((len(IOU_THRESHOLDS), len(p)), dtype=bool)
        if len(p) and len(g):
            iou = box_iou(torch.from_numpy(p[:, :4]), torch.from_numpy(g)).numpy()
            tp = match_detections_ultralytics(iou, pc, gc)
        self._ul_scores.append(p[:, 4].astype(np.float32))  # val.py ranks float32 confidences
        self._ul_cls.append(pc)
        self._ul_tp.append(tp)

    def compute(self) -> dict:
        """Both metrics over everything accumulated.

        Returns the COCO metrics at the top level (the keys below), and the same keys computed as YOLOv5
        val.py does under ``"ultralytics"`` (``res["ultralytics"]["map50"]`` is val.py's mAP@0.5). Keys:
        ``map`` (mAP@0.5:0.95), ``map50`` (AP at IoU 0.5), ``precision`` and ``recall`` (means over classes
        with GT, at the confidence ``f1_conf`` that maximises the smoothed mean-over-classes F1 at IoU 0.5
        on a 1000-point grid, as ultralytics reports P and R), ``f1_conf``, ``images``, ``instances``,
        ``maps`` (list of per-class mAP@0.5:0.95, ``None`` for classes without GT; val.py fills those with
        the mean) and ``per_class``: one dict per class with GT, with keys ``class``, ``name``, ``images``
        (images holding the class), ``instances``, ``precision``, ``recall``, ``map50``, ``map``. All means
        are 0.0 when there is no GT. Classes with GT but no detection count as AP, P and R 0 in both.
        """
        res = self._summary(self._scores, self._cls, self._tp, coco_ap, sort_kind="mergesort")
        res["ultralytics"] = self._summary(self._ul_scores, self._ul_cls, self._ul_tp, ap_trapezoid,
                                           sort_kind="quicksort")
        return res

    def _summary(self, scores, cls, tp, ap_fn, sort_kind) -> dict:
        """The metrics dict of one matching (per-image lists of scores, classes, (T, n) TPs) and AP rule.

        Detections are ranked by ``np.argsort(-scores, kind=sort_kind)`` over everything: "mergesort"
        breaks score ties by update order (COCO), "quicksort" on float32 scores as val.py does.
        """
        T = len(IOU_THRESHOLDS)
        scores = np.concatenate(scores) if scores else np.zeros(0)
        cls = np.concatenate(cls) if cls else np.zeros(0, dtype=np.int64)
        tp = np.concatenate(tp, 1) if tp else np.zeros((T, 0), dtype=bool)
        px = np.linspace(0, 1, 1000)
        classes = np.nonzero(self.instances > 0)[0]
        ranked = np.argsort(-scores, kind=sort_kind)
        ap = np.zeros((len(classes), T))
        p_curve, r_curve = np.zeros((len(classes), len(px))), np.zeros((len(classes), len(px)))
        for k, c in enumerate(classes):
            order = ranked[cls[ranked] == c]
            if not len(order):
                continue
            conf, tpc, npig = scores[order], tp[:, order], self.instances[c]
            tps = np.cumsum(tpc, axis=1).astype(float)
            fps = np.cumsum(~tpc, axis=1).astype(float)
            rc = tps / npig
            pr = tps / (tps + fps + np.spacing(1))
            for t in range(T):
                ap[k, t] = ap_fn(rc[t], pr[t])
            r_curve[k] = np.interp(-px, -conf, rc[0], left=0)  # P/R vs confidence threshold, IoU 0.5
            p_curve[k] = np.interp(-px, -conf, pr[0], left=1)
        f1 = 2 * p_curve * r_curve / (p_curve + r_curve + 1e-16)
        i = int(_smooth(f1.mean(0), 0.1).argmax()) if len(classes) else 0
        p, r = p_curve[:, i], r_curve[:, i]
        maps = [None] * self.nc
        per_class = []
        for k, c in enumerate(classes):
            maps[c] = float(ap[k].mean())
            per_class.append({"class": int(c), "name": self.names[c], "images": int(self.images_per_class[c]),
                              "instances": int(self.instances[c]), "precision": float(p[k]),
                              "recall": float(r[k]), "map50": float(ap[k, 0]), "map": float(ap[k].mean())})
        mean = (lambda a: float(a.mean()) if len(classes) else 0.0)
        return {"precision": mean(p), "recall": mean(r), "map50": mean(ap[:, 0]), "map": mean(ap),
                "f1_conf": float(px[i]), "images": self.seen, "instances": int(self.instances.sum()),
                "maps": maps, "per_class": per_class}


def fitness(results: dict) -> float:
    """Single model-selection score, as ultralytics: 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95.

    ``fitness(res["ultralytics"])`` is val.py's fitness; ``fitness(res)`` the same formula on COCO mAP."""
    return 0.1 * results["map50"] + 0.9 * results["map"]


# --------------------------------------------------------------------------- COCO JSON


def to_coco_json(records, gt_path=None, pred_path=None, names=None, category_ids=None):
    """COCO ground-truth and detection JSON from per-image ``records``; writes each path given (atomically).

    ``records``: dicts with ``id`` (int or str image id), ``pred`` (n, 6) xyxy/conf/cls, ``gt_boxes``
    (m, 4) xyxy, ``gt_cls`` (m,), optionally ``file_name``, ``width``, ``height`` — as
    ``DetectionMetrics(keep_records=True).records`` holds them. ``category_ids`` maps a class index to a
    COCO category id (default: the index itself, as ultralytics does for non-COCO data); ``names`` the
    category names. Boxes are written as [x, y, w, h] floats, GT ``area`` = w * h, annotation ids from 1.

    Returns ``(gt_dict, pred_list)``.
    """
    def cat_id(c):
        return int(category_ids[c]) if category_ids is not None else int(c)

    def xywh(b):
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)

    images, anns, dets = [], [], []
    max_cls = -1
    for r in records:
        iid = int(r["id"]) if isinstance(r["id"], (int, np.integer)) else str(r["id"])
        img = {"id": iid, "file_name": str(r.get("file_name", iid))}
        for key in ("width", "height"):
            if r.get(key) is not None:
                img[key] = int(r[key])
        images.append(img)
        gc = np.asarray(r["gt_cls"]).reshape(-1).astype(int)
        for c, (x, y, w, h) in zip(gc, xywh(r["gt_boxes"]).tolist()):
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat_id(c),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        p = np.asarray(r["pred"], dtype=np.float64).reshape(-1, 6)
        for (x, y, w, h), s, c in zip(xywh(p[:, :4]).tolist(), p[:, 4].tolist(), p[:, 5].astype(int).tolist()):
            dets.append({"image_id": iid, "category_id": cat_id(c), "bbox": [x, y, w, h], "score": s})
        max_cls = max(max_cls, int(gc.max()) if gc.size else -1, int(p[:, 5].max()) if len(p) else -1)
    n_cat = len(names) if names is not None else (len(category_ids) if category_ids is not None else max_cls + 1)
    cats = [{"id": cat_id(c), "name": str(names[c]) if names is not None else str(c)} for c in range(n_cat)]
    gt = {"info": {"description": "compress ground truth"}, "images": images, "annotations": anns,
          "categories": cats}
    # compact JSON: a predictions file can hold millions of boxes
    if gt_path is not None:
        write_text(gt_path, json.dumps(gt, separators=(",", ":")))
    if pred_path is not None:
        write_text(pred_path, json.dumps(dets, separators=(",", ":")))
    return gt, dets
