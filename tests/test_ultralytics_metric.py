"""The YOLOv5 val.py-equivalent metric, on hand-computed cases.

Expected values are derived in the comments from val.py's definitions (process_batch, ap_per_class,
compute_ap).
"""
import numpy as np
import pytest

from compress.engine.metrics import (DetectionMetrics, ap_trapezoid, coco_ap, fitness,
                                     match_detections_ultralytics)
from compress.engine.validate import metrics_table, select_metric

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _compute(pred, gt, gt_cls, nc=1):
    m = DetectionMetrics(nc)
    m.update(np.asarray(pred, float), np.asarray(gt, float), np.asarray(gt_cls))
    return m.compute()


# ------------------------------------------------------------------------------------------ matching


def test_detection_keeps_its_best_gt_even_when_another_is_free():
    # GT0 = [0,0,10,10], GT1 = [1,0,11,10] overlap with IoU 90/110 = 0.818. Two detections on GT0 exactly
    # (conf 0.9, 0.8): IoU 1 with GT0, 0.818 with GT1.
    gt = [[0, 0, 10, 10], [1, 0, 11, 10]]
    pred = [[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]]
    res = _compute(pred, gt, [0, 0])
    # COCO: the second detection takes the free GT1 at the 7 thresholds 0.50..0.80 -> TP, TP: recall
    # 0.5, 1 at precision 1, AP 1. At 0.85..0.95 it is a FP: recall 0.5, 0.5, precision 1, 0.5: the
    # envelope is 1 up to recall 0.5, 51 of the 101 samples -> AP 51/101.
    assert res["map50"] == pytest.approx(1.0)
    assert res["map"] == pytest.approx((7 + 3 * 51 / 101) / 10)
    # val.py: both pick GT0 (their highest IoU), GT0 keeps the first; the second is a FP at every threshold.
    # Padded curve: recall (0, .5, .5, 1), envelope (1, 1, .5, 0); interpolated at 0, .01, .., 1: 1 up
    # to 0.49, 0.5 at 0.5 (np.interp takes the last of duplicate x), then 1 - x. Trapezoid:
    # 49 * .01 + (1 + .5) / 2 * .01 + integral of (1 - x) over [.5, 1] = .49 + .0075 + .125 = .6225.
    ul = res["ultralytics"]
    assert ul["map50"] == pytest.approx(0.6225) and ul["map"] == pytest.approx(0.6225)


def test_first_detection_wins_a_gt_not_the_highest_iou():
    # One GT [0,0,10,10]; det 0 (conf 0.9) [0,0,6,10] has IoU 0.6, det 1 (0.8) [0,0,9,10] IoU 0.9.
    # val.py: each detection picks the GT; the GT keeps the lower index (higher confidence), so det 0 is
    # the TP up to threshold 0.6 and det 1 only above it, a global IoU-greedy matching would take det 1.
    iou = np.array([[0.6], [0.9]])
    tp = match_detections_ultralytics(iou, [0, 0], [0])
    want = np.array([[t <= 0.6, t > 0.6 and t <= 0.9] for t in THRESHOLDS])
    assert tp.tolist() == want.tolist()
    # classes must agree, and IoU >= threshold counts (val.py compares with >=)
    assert not match_detections_ultralytics(iou, [1, 1], [0]).any()
    assert match_detections_ultralytics(np.array([[0.5]]), [0], [0])[0, 0]


def test_each_gt_and_detection_used_once_per_threshold():
    rng = np.random.default_rng(0)
    for _ in range(20):
        iou = rng.uniform(0, 1, (12, 5)) * (rng.uniform(0, 1, (12, 5)) < 0.5)
        dc, gc = rng.integers(0, 2, 12), rng.integers(0, 2, 5)
        tp = match_detections_ultralytics(iou, dc, gc)
        n_hits = tp.sum(1)
        for t, thr in enumerate(THRESHOLDS):
            ok = (iou >= thr) & (dc[:, None] == gc[None, :])
            assert n_hits[t] <= min(ok.any(0).sum(), ok.any(1).sum())
            assert not (tp[t] & ~ok.any(1)).any()
        assert (np.diff(n_hits) <= 0).all()  # a higher threshold never matches more


# ------------------------------------------------------------------------------------------ AP rule


def test_trapezoid_and_101_sample_mean_on_one_curve():
    # 4 GT; detections by score: TP, TP, FP, TP -> recall .25 .5 .5 .75, precision 1 1 2/3 .75
    rc, pr = np.array([.25, .5, .5, .75]), np.array([1, 1, 2 / 3, .75])
    # COCO: envelope 1 for recall <= .5 (51 samples), .75 up to .75 (25 samples), 0 after
    assert coco_ap(rc, pr) == pytest.approx((51 + 25 * .75) / 101)  # 0.6906
    # val.py: padded envelope (1, 1, 1, .75, .75, 0) at recall (0, .25, .5, .5, .75, 1): 1 up to .49,
    # .75 at .5, .75 up to .75, then a ramp to 0 at 1: .49 + (1 + .75) / 2 * .01 + .25 * .75 + .25 * .75 / 2
    assert ap_trapezoid(rc, pr) == pytest.approx(0.49 + 0.00875 + 0.1875 + 0.09375)  # 0.78


def test_perfect_detections_score_0995_with_val_py():
    # recall 1 at precision 1: COCO AP 1. val.py pads (recall 1, precision 0) after the curve and
    # np.interp(1, ...) returns that last point, so the final trapezoid is (1 + 0) / 2 * .01: 0.995.
    res = _compute([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 40, 0.8, 0]], [[0, 0, 10, 10], [20, 20, 30, 40]], [0, 0])
    assert res["map"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0)
    ul = res["ultralytics"]
    assert ul["map"] == pytest.approx(0.995) and ul["map50"] == pytest.approx(0.995)
    assert ul["precision"] == pytest.approx(1.0) and ul["recall"] == pytest.approx(1.0)
    assert fitness(ul) == pytest.approx(0.995)


def test_classes_with_gt_but_no_detections_count_as_zero():
    # class 0 found perfectly, class 1 has a GT and no detection, class 2 only a false positive (no GT)
    gt, gc = [[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1]
    pred = [[0, 0, 10, 10, 0.9, 0], [100, 100, 120, 120, 0.7, 2]]
    res = _compute(pred, gt, gc, nc=3)
    for r, ap0 in ((res, 1.0), (res["ultralytics"], 0.995)):
        assert [c["class"] for c in r["per_class"]] == [0, 1]
        assert r["map50"] == pytest.approx(ap0 / 2) and r["maps"][2] is None
        assert r["per_class"][1]["map"] == 0.0 and r["per_class"][1]["precision"] == 0.0
        assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)


def test_result_keys_and_select_metric():
    res = _compute([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.3, 0]], [[0, 0, 10, 10]], [0])
    # F1 is 1 for confidence thresholds in (0.3, 0.9]: the F1-best confidence lies there (not the NMS --conf)
    assert "conf" not in res and 0.3 < res["f1_conf"] < 0.9 and 0.3 < res["ultralytics"]["f1_conf"] < 0.9
    keys = {"precision", "recall", "map50", "map", "f1_conf", "images", "instances", "maps", "per_class"}
    assert set(res["ultralytics"]) == keys and keys | {"ultralytics"} == set(res)
    assert select_metric(res, "ultralytics") is res["ultralytics"]
    assert set(select_metric(res, "coco")) == keys
    with pytest.raises(ValueError, match="metric"):
        select_metric(res, "voc")
    assert "0.995" in metrics_table(select_metric(res, "ultralytics"))
    assert "1.000" in metrics_table(select_metric(res, "coco"))


def test_max_det_caps_only_the_coco_metric():
    # 3 FPs above one TP in one image; COCO's max_det=2 (per image and class) drops the TP, val.py keeps it
    pred = [[50, 50, 60, 60, 0.9, 0], [70, 70, 80, 80, 0.8, 0], [90, 90, 99, 99, 0.7, 0], [0, 0, 10, 10, 0.6, 0]]
    m = DetectionMetrics(1, max_det=2)
    m.update(np.array(pred, float), np.array([[0, 0, 10, 10.0]]), np.array([0]))
    res = m.compute()
    assert res["map50"] == 0.0
    assert res["ultralytics"]["map50"] > 0.1
