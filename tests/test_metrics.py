"""Box ops, NMS, non_max_suppression, and mAP agreement with pycocotools COCOeval."""
import contextlib
import io
import json
import time

import numpy as np
import pytest
import torch

from compress.data.augment import scale_boxes
from compress.engine.metrics import (
    DetectionMetrics, bbox_iou, box_iou, fitness, match_detections, nms, non_max_suppression,
    to_coco_json, xywh2xyxy, xyxy2xywh,
)


# --------------------------------------------------------------------------- boxes and IoU


def test_box_conversions_round_trip():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.0, 3.0]])
    xywh = xyxy2xywh(xyxy)
    assert torch.allclose(xywh, torch.tensor([[30.0, 50.0, 40.0, 60.0], [0.5, 1.5, 1.0, 3.0]]))
    assert torch.allclose(xywh2xyxy(xywh), xyxy)
    assert np.allclose(xywh2xyxy(np.array([[30, 50, 40, 60]])), [[10, 20, 50, 80]])  # numpy, int input
    assert xyxy[0, 0] == 10  # inputs untouched


def test_box_iou_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0], [3, 3, 3, 3.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0, 0.0]]))
    # elementwise variant agrees with the pairwise one
    assert torch.allclose(bbox_iou(a.expand(4, 4), b, xywh=False), box_iou(a, b)[0], atol=1e-6)


def test_scale_boxes_inverts_letterbox():
    # a 200x100 (h x w) image letterboxed to 64x64: gain 0.32, pad 16 px left/right
    boxes = torch.tensor([[16.0 + 3.2, 6.4, 16.0 + 32.0, 32.0]])
    out = scale_boxes((64, 64), boxes.clone(), (200, 100))
    assert torch.allclose(out, torch.tensor([[10.0, 20.0, 100.0, 100.0]]), atol=1e-4)


# --------------------------------------------------------------------------- NMS


def _greedy_reference(boxes, scores, thr):
    """Textbook greedy NMS, one box at a time (IoU computed pair by pair in plain Python)."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    b, s = boxes.tolist(), scores.tolist()
    keep = []
    for i in sorted(range(len(s)), key=lambda i: -s[i]):
        if all(iou(b[i], b[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def _random_boxes(n, gen, spread=200.0):
    xy = torch.rand(n, 2, generator=gen) * spread
    wh = torch.rand(n, 2, generator=gen) * 40 + 5
    return torch.cat((xy, xy + wh), 1), torch.rand(n, generator=gen)


@pytest.mark.parametrize("seed,n,thr", [(0, 300, 0.5), (1, 700, 0.3), (2, 50, 0.7), (3, 1200, 0.6)])
def test_nms_matches_brute_force(seed, n, thr):
    gen = torch.Generator().manual_seed(seed)
    boxes, scores = _random_boxes(n, gen)
    kept = nms(boxes, scores, thr, block=128)  # small blocks: exercise the cross-block path
    assert kept.tolist() == _greedy_reference(boxes, scores, thr)
    assert nms(boxes, scores, thr, max_keep=7).tolist() == kept[:7].tolist()


def test_nms_chain_needs_the_fixed_point():
    # boxes sliding right by 4 px, scores decreasing: each overlaps the next by IoU 0.6; greedy keeps every other
    boxes = torch.tensor([[4.0 * i, 0.0, 4.0 * i + 20, 10.0] for i in range(40)])
    scores = torch.linspace(1, 0.1, 40)
    assert nms(boxes, scores, 0.5).tolist() == _greedy_reference(boxes, scores, 0.5) == list(range(0, 40, 2))
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0


def test_nms_is_fast_on_thousands_of_boxes():
    gen = torch.Generator().manual_seed(5)
    boxes, scores = _random_boxes(3000, gen, spread=600.0)
    t = time.perf_counter()
    kept = nms(boxes, scores, 0.5)
    assert time.perf_counter() - t < 5.0  # a Python loop over box pairs takes minutes
    assert 1000 < len(kept) < 3000


def _decoded(boxes_xywh, obj, cls_scores):
    return torch.cat((boxes_xywh, obj[:, None], cls_scores), 1)[None]


def test_non_max_suppression_filters_and_shapes():
    # A and B: overlapping class-0 boxes; C: a class-1 box on top of A; D: a box scoring both classes 0.5;
    # E: objectness below the threshold
    xywh = torch.tensor([[50.0, 50, 20, 20], [51.0, 50, 20, 20], [50.0, 50, 20, 20], [120.0, 120, 20, 20],
                         [150.0, 150, 10, 10]])
    obj = torch.tensor([0.9, 0.8, 0.9, 0.9, 0.01])
    cls = torch.tensor([[0.9, 0.05], [0.9, 0.05], [0.05, 0.9], [0.5, 0.5], [1.0, 1.0]])
    pred = torch.cat((_decoded(xywh, obj, cls), torch.zeros(1, 5, 7)), 0)  # image 2: nothing above conf
    out = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5)
    assert len(out) == 2 and out[1].shape == (0, 6)
    det = out[0]
    assert det.shape == (4, 6)  # A (c0), C (c1), D (c0), D (c1); B suppressed by A
    assert torch.allclose(det[:, 4], torch.tensor([0.81, 0.81, 0.45, 0.45]))  # obj * cls, sorted
    assert sorted(det[:2, 5].tolist()) == [0.0, 1.0] and sorted(det[2:, 5].tolist()) == [0.0, 1.0]
    assert torch.allclose(det[0, :4], torch.tensor([40.0, 40, 60, 60]))  # xywh -> xyxy
    assert torch.allclose(det[2, :4], torch.tensor([110.0, 110, 130, 130]))
    assert non_max_suppression(pred, 0.25, 0.5, multi_label=False)[0].shape == (3, 6)  # D: one class only
    assert non_max_suppression(pred, 0.25, 0.5, agnostic=True)[0].shape == (2, 6)  # one per location
    only1 = non_max_suppression(pred, 0.25, 0.5, classes=[1])[0]
    assert only1[:, 5].tolist() == [1.0, 1.0]
    assert non_max_suppression(pred, 0.5, 0.5)[0].shape == (2, 6)  # conf_thres applies to obj * cls
    assert non_max_suppression((pred, None), 0.25, 0.5, max_det=1)[0].shape == (1, 6)  # tuple form, max_det
    assert non_max_suppression(pred, 0.25, 0.5, max_nms=1)[0].shape == (1, 6)


def test_non_max_suppression_does_not_modify_input():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 500, 9, generator=gen)
    pred[..., :2] *= 300
    pred[..., 2:4] *= 50
    before = pred.clone()
    out = non_max_suppression(pred, 0.1, 0.45)
    assert torch.equal(pred, before)
    assert all(o.shape[1] == 6 and (o[:, 4] > 0.1).all() for o in out)


# --------------------------------------------------------------------------- mAP vs pycocotools


def _synthetic(seed, n_images=40, nc=5, p_miss=0.15, p_fp=0.8, jitter=0.08, gt_only_class=None,
               pred_only_class=None, dup=0.2):
    """Per-image (pred (n,6), gt_boxes (m,4), gt_cls (m,)) with jittered true boxes, misses, duplicates and
    false positives; scores loosely tied to box quality so AP is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n_images):
        m = rng.integers(0, 12)
        xy = rng.uniform(0, 500, (m, 2))
        wh = rng.uniform(8, 150, (m, 2))
        gt = np.concatenate((xy, xy + wh), 1)
        classes = [c for c in range(nc) if c != pred_only_class]
        gc = rng.choice(classes, m)
        preds = []
        for b, c in zip(gt, gc):
            if rng.random() < p_miss or c == gt_only_class:
                continue
            for _ in range(1 + (rng.random() < dup)):
                noise = rng.normal(0, jitter, 4) * np.r_[b[2] - b[0], b[3] - b[1], b[2] - b[0], b[3] - b[1]]
                pb = b + noise
                pb[2:] = np.maximum(pb[2:], pb[:2] + 1)
                cls = c if rng.random() > 0.1 else rng.integers(0, nc)
                if cls == gt_only_class:
                    cls = c
                score = np.clip(1 - np.abs(noise).mean() / 20 - rng.uniform(0, 0.4), 0.01, 1)
                preds.append([*pb, score, cls])
        for _ in range(rng.poisson(p_fp * 4)):
            xy = rng.uniform(0, 500, 2)
            cls = rng.choice([c for c in range(nc) if c != gt_only_class])
            preds.append([*xy, *(xy + rng.uniform(8, 150, 2)), rng.uniform(0.01, 0.7), cls])
        data.append((np.array(preds, dtype=np.float64).reshape(-1, 6), gt, gc))
    return data


def _cocoeval(records, nc, max_det, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "pred.json"
    to_coco_json(records, gt_file, dt_file, names=[f"c{i}" for i in range(nc)])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(str(dt_file))
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [max_det]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # T x R x K, area 'all', maxDets[-1]
    valid = prec[0, 0] > -1  # classes with GT
    return prec[:, :, valid].mean(), prec[0][:, valid].mean(), prec[:, :, valid].mean(axis=(0, 1))


def _ours(data, nc, max_det):
    m = DetectionMetrics(nc, [f"c{i}" for i in range(nc)], max_det=max_det, keep_records=True)
    for pred, gt, gc in data:
        m.update(torch.from_numpy(pred).float(), torch.from_numpy(gt).float(), torch.from_numpy(gc))
    return m, m.compute()


@pytest.mark.parametrize("seed,kwargs,max_det", [
    (0, {}, 100),
    (1, dict(jitter=0.15, p_fp=2.0), 100),
    (2, dict(nc=3, jitter=0.03, dup=0.5), 100),
    (3, dict(gt_only_class=1, pred_only_class=4), 100),  # a class with GT but no predictions, and the reverse
    (4, dict(p_fp=6.0, nc=2), 3),                          # max_det cap binds
])
def test_map_agrees_with_pycocotools(seed, kwargs, max_det, tmp_path):
    nc = kwargs.get("nc", 5)
    data = _synthetic(seed, **kwargs)
    m, res = _ours(data, nc, max_det)
    coco_map, coco_map50, coco_per_class = _cocoeval(m.records, nc, max_det, tmp_path)
    assert 0.05 < res["map"] < 0.95  # a non-trivial case
    # the same definition as COCOeval, computed in float64 on the same boxes: equal up to float rounding
    assert abs(res["map"] - coco_map) < 1e-12, (res["map"], coco_map)
    assert abs(res["map50"] - coco_map50) < 1e-12, (res["map50"], coco_map50)
    ours_per_class = [c["map"] for c in res["per_class"]]
    assert np.allclose(ours_per_class, coco_per_class, rtol=0, atol=1e-12)
    if "gt_only_class" in kwargs:
        classes = [c["class"] for c in res["per_class"]]
        assert 4 not in classes and res["maps"][4] is None  # predictions but no GT: left out of the mean
        one = next(c for c in res["per_class"] if c["class"] == 1)
        assert one["map"] == 0.0 and one["recall"] == 0.0 and one["instances"] > 0


def test_perfect_predictions_give_map_one():
    data = _synthetic(7, p_fp=0, p_miss=0, dup=0)
    m = DetectionMetrics(5)
    for _, gt, gc in data:
        pred = np.concatenate((gt, np.full((len(gt), 1), 0.9), gc[:, None]), 1)
        m.update(pred, gt, gc)
    res = m.compute()
    assert res["map"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0)
    assert res["precision"] == pytest.approx(1.0) and res["recall"] == pytest.approx(1.0)
    assert fitness(res) == pytest.approx(1.0)
    assert res["instances"] == sum(len(g) for _, g, _ in data) and res["images"] == len(data)


def test_precision_recall_at_best_f1():
    # one class, 4 GT; detections: 2 TPs (0.9, 0.8), a FP (0.7), 1 TP (0.3); one GT missed
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], dtype=float)
    pred = np.array([[0, 0, 10, 10, 0.9, 0], [20, 0, 30, 10, 0.8, 0], [100, 100, 110, 110, 0.7, 0],
                     [40, 0, 50, 10, 0.3, 0]], dtype=float)
    m = DetectionMetrics(1)
    m.update(pred, gt, np.zeros(4))
    res = m.compute()
    # F1 is best keeping all four detections (P 3/4, R 3/4) and must be reported there
    assert res["precision"] == pytest.approx(0.75, abs=0.02) and res["recall"] == pytest.approx(0.75, abs=0.02)
    # COCO AP at 0.5: envelope 1 for recall <= 0.5, 0.75 up to recall 0.75, 0 after
    expected = (51 * 1.0 + 25 * 0.75) / 101
    assert res["map50"] == pytest.approx(expected)
    assert res["f1_conf"] <= 0.3 and "conf" not in res  # the F1-best confidence (--conf is the NMS threshold)
    # the same detections by val.py's rule (tests/test_ultralytics_metric.py derives 0.78)
    assert res["ultralytics"]["map50"] == pytest.approx(0.78)
    assert res["ultralytics"]["precision"] == pytest.approx(0.75, abs=0.02)
    from compress.engine.validate import metrics_table

    assert "mAP50-95" in metrics_table(res) and "all" in metrics_table(res)


def test_match_detections_takes_best_unmatched_gt():
    # det 0 overlaps both GTs, best with GT 1; det 1 then only has GT 0 left
    iou = np.array([[0.6, 0.9], [0.55, 0.95]])
    tp = match_detections(iou, [0.5, 0.58, 0.92])
    assert tp.tolist() == [[True, True], [True, False], [False, True]]


def test_update_rejects_bad_shapes_and_classes():
    m = DetectionMetrics(2)
    with pytest.raises(ValueError, match="pred"):
        m.update(np.zeros((3, 5)), np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="gt_cls"):
        m.update(np.zeros((0, 6)), np.array([[0, 0, 1, 1.0]]), np.array([2]))
    m.update(torch.zeros(0, 6), torch.zeros(0, 4), torch.zeros(0))  # empty image is fine
    res = m.compute()
    assert res["map"] == 0.0 and res["images"] == 1 and res["per_class"] == []


def test_to_coco_json_files(tmp_path):
    recs = [dict(id=3, pred=np.array([[1, 2, 11, 22, 0.5, 1]]), gt_boxes=np.array([[1, 2, 11, 22]]),
                 gt_cls=np.array([1]), file_name="a.jpg", width=64, height=48)]
    gt, dets = to_coco_json(recs, tmp_path / "gt.json", tmp_path / "dt.json", names=["a", "b"],
                            category_ids=[1, 2])
    on_disk = json.loads((tmp_path / "gt.json").read_text())
    assert on_disk == gt
    assert gt["images"] == [{"id": 3, "file_name": "a.jpg", "width": 64, "height": 48}]
    assert gt["annotations"][0] == {"id": 1, "image_id": 3, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 20.0],
                                    "area": 200.0, "iscrowd": 0}
    assert gt["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert json.loads((tmp_path / "dt.json").read_text()) == dets == [
        {"image_id": 3, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
