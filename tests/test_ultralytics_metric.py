"""The YOLOv5 val.py-equivalent metric and rectangular val batches, on hand-computed cases.

Expected values are derived in the comments from val.py's definitions (process_batch, ap_per_class,
compute_ap, LoadImagesAndLabels with rect=True); benchmarks/val_vs_ultralytics.py checks the same
functions against the real val.py code.
"""
import cv2
import numpy as np
import pytest
import torch

from compress.data.augment import PAD_VALUE, scale_boxes, xywhn2xyxy
from compress.data.dataset import create_dataloader, rect_batch_shapes
from compress.engine.metrics import (DetectionMetrics, ap_trapezoid, coco_ap, fitness,
                                     match_detections_ultralytics)
from compress.engine.validate import evaluate, metrics_table, select_metric
from compress.errors import UserError

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


# ------------------------------------------------------------------------------------------ rect batches


def test_rect_batch_shapes_by_hand():
    # (h, w): A 320x320 (h/w 1), B 160x320 (0.5), C 320x160 (2), D 240x480 (0.5) at imgsz 320, stride 32,
    # pad 0.5. Aspect order (stable): B, D, A, C. Side s -> ceil(s * 320 / 32 + 0.5) * 32:
    # 1 -> ceil(10.5) = 11 -> 352;  0.5 -> ceil(5.5) = 6 -> 192.
    hw = [(320, 320), (160, 320), (320, 160), (240, 480)]
    order, shapes, bi = rect_batch_shapes(hw, 1, 320, 32, 0.5)
    assert order.tolist() == [1, 3, 0, 2] and bi.tolist() == [0, 1, 2, 3]
    # B, D wide: (max ratio .5, 1); A square: (1, 1); C tall: (1, 1 / 2)
    assert shapes.tolist() == [[192, 352], [192, 352], [352, 352], [352, 192]]
    # batches of 2: {B, D} both wide -> (192, 352); {A, C} ratios 1 and 2 are not all > 1 -> (352, 352)
    order, shapes, bi = rect_batch_shapes(hw, 2, 320, 32, 0.5)
    assert shapes.tolist() == [[192, 352], [352, 352]] and bi.tolist() == [0, 0, 1, 1]
    assert rect_batch_shapes(hw, 4, 320, 32, 0.5)[1].tolist() == [[352, 352]]  # mixed: square
    assert rect_batch_shapes(hw, 1, 320, 32, 0.0)[1].tolist() == [[160, 320], [160, 320], [320, 320], [320, 160]]
    # 3 images of h/w 0.7 at 256, stride 64: ceil(.7 * 4 + .5) = ceil(3.3) = 4 -> 256; a partial last batch
    order, shapes, bi = rect_batch_shapes([(70, 100)] * 3, 2, 256, 64, 0.5)
    assert shapes.tolist() == [[256, 320], [256, 320]] and bi.tolist() == [0, 0, 1]


def _write_images(root, sizes_wh, labels):
    (root / "images").mkdir()
    (root / "labels").mkdir()
    files = []
    rng = np.random.default_rng(0)
    for k, ((w, h), lab) in enumerate(zip(sizes_wh, labels)):
        f = root / "images" / f"{k}.png"
        cv2.imwrite(str(f), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (root / "labels" / f"{k}.txt").write_text("".join(f"{c} {x} {y} {bw} {bh}\n" for c, x, y, bw, bh in lab))
        files.append(str(f))
    return files


@pytest.fixture
def mixed_images(tmp_path):
    # (w, h): square, wide, tall, wide 2x larger than imgsz, and 320x215 whose vertical pad is odd (41 px)
    sizes = [(320, 320), (320, 160), (160, 320), (480, 240), (320, 215)]
    labels = [[(0, .5, .5, .4, .2), (1, .2, .8, .1, .3)], [(1, .3, .6, .2, .5)], [(0, .7, .4, .3, .1)],
              [(1, .5, .5, .9, .8), (0, .1, .1, .05, .1)], [(0, .25, .75, .3, .3)]]
    return _write_images(tmp_path, sizes, labels), sizes


def test_rect_loader_shapes_padding_and_order(mixed_images):
    files, sizes = mixed_images
    loader, ds = create_dataloader(files, 320, 2, augment=False, rect=True, pad=0.5, stride=32)
    # h/w: 1, .5, 2, .5, .672 -> order 1, 3, 4, 0, 2; batches {1, 3}: (192, 352); {4, 0}: ratios .672 and
    # 1, not all < 1 -> (352, 352); {2}: (352, ceil(.5 * 10 + .5) * 32 = 192)
    assert [f.rsplit("/", 1)[1] for f in ds.im_files] == ["1.png", "3.png", "4.png", "0.png", "2.png"]
    batches = list(loader)
    assert [tuple(b[0].shape[2:]) for b in batches] == [(192, 352), (352, 352), (352, 192)]
    (imgs, _, paths, shapes) = batches[1]
    (h0, w0), ((rh, rw), (pw, ph)) = shapes[0]  # 4.png: 320x215, no resize, pads 16 and (137 -> 68, 69)
    assert (h0, w0) == (215, 320) and (rh, rw) == (1.0, 1.0) and (pw, ph) == (16.0, 68.0)
    img = imgs[0].numpy()
    assert (img[:, :68] == PAD_VALUE).all() and (img[:, 68 + 215:] == PAD_VALUE).all()
    assert (img[:, :, :16] == PAD_VALUE).all() and (img[:, :, 16 + 320:] == PAD_VALUE).all()
    assert img.shape[1] - 68 - 215 == 69
    im0 = cv2.imread(paths[0])[:, :, ::-1].transpose(2, 0, 1)
    assert (img[:, 68:68 + 215, 16:16 + 320] == im0).all()  # never enlarged: the original pixels
    (h0, w0), ((rh, rw), (pw, ph)) = batches[0][3][1]  # 3.png: 480x240 -> 320x160 in 192x352
    assert (h0, w0) == (240, 480) and (rh, rw) == pytest.approx((2 / 3, 2 / 3)) and (pw, ph) == (16.0, 16.0)
    # the default loader still letterboxes every image to imgsz x imgsz in file order
    loader, ds = create_dataloader(files, 320, 2, augment=False)
    assert ds.im_files == files and {tuple(b[0].shape[2:]) for b in loader} == {(320, 320)}


def test_rect_boxes_round_trip(mixed_images):
    files, _ = mixed_images
    loader, ds = create_dataloader(files, 320, 2, augment=False, rect=True, pad=0.5)
    n = 0
    for imgs, targets, paths, shapes in loader:
        h, w = imgs.shape[2:]
        for si, path in enumerate(paths):
            t = targets[targets[:, 0] == si]
            boxes = xywhn2xyxy(t[:, 2:].numpy().astype(np.float64), w, h)
            back = scale_boxes((h, w), boxes, shapes[si][0], shapes[si][1])
            i = ds.im_files.index(path)
            h0, w0 = ds.shapes[i]
            assert np.allclose(back, xywhn2xyxy(ds.labels[i][:, 1:].astype(np.float64), w0, h0), atol=1e-3)
            n += len(t)
    assert n == sum(len(lb) for lb in ds.labels) == 7


def test_rect_evaluate_of_perfect_predictions(mixed_images):
    """Predictions equal to the targets of each rect batch come out as perfect detections."""
    files, _ = mixed_images
    loader, _ = create_dataloader(files, 320, 2, augment=False, rect=True, pad=0.5)
    batches = list(loader)
    queue = [b[1] for b in batches]

    def predict(x):  # decoded (B, anchors, 5 + nc): the batch's targets as xywh pixels, obj 0.9, one-hot
        t = queue.pop(0)
        h, w = x.shape[2:]
        out = torch.zeros(x.shape[0], 8, 7)
        for si in range(x.shape[0]):
            ti = t[t[:, 0] == si]
            out[si, :len(ti), :4] = ti[:, 2:] * torch.tensor([w, h, w, h])
            out[si, :len(ti), 4] = 0.9
            out[si, torch.arange(len(ti)), 5 + ti[:, 1].long()] = 1.0
        return out

    res = evaluate(predict, batches, nc=2, progress=False)
    assert res["map"] == pytest.approx(1.0) and res["ultralytics"]["map"] == pytest.approx(0.995)
    assert res["images"] == 5 and res["instances"] == 7


def test_rect_refuses_shuffle_augment_and_ddp(mixed_images):
    files, _ = mixed_images
    with pytest.raises(UserError, match="rect"):
        create_dataloader(files, 320, 2, augment=False, rect=True, shuffle=True)
    with pytest.raises(UserError, match="rect"):
        create_dataloader(files, 320, 2, augment=True, rect=True)
    with pytest.raises(UserError, match="rect"):
        create_dataloader(files, 320, 2, augment=False, rect=True, rank=0, world_size=2)


def test_rect_resizes_and_pads_as_val_py(tmp_path):
    files = _write_images(tmp_path, [(400, 262)], [[(0, .5, .5, .5, .5)]])
    _, rect = create_dataloader(files, 320, 1, augment=False, rect=True, pad=0.5)
    _, square = create_dataloader(files, 320, 1, augment=False)
    assert rect.load_image(0)[2] == (209, 320)  # 262 * 0.8 = 209.6: truncated, as YOLOv5's loader does
    assert square.load_image(0)[2] == (210, 320)  # the default loader rounds
    # batch shape: h ceil(262 / 400 * 10 + .5) = ceil(7.05) = 8 -> 256, w 11 -> 352; padding 32 and 47
    img, t, _, ((h0, w0), ((rh, rw), (pw, ph))) = rect[0]
    assert img.shape == (3, 256, 352) and (h0, w0) == (262, 400)
    assert (rh, rw) == (209 / 262, 0.8)
    # 47 px: 23 on top, 24 below. val.py reports the pad as 23.5 (and maps boxes back with h / h0 for both
    # axes); the actual offset is what maps boxes back exactly
    assert (pw, ph) == (16.0, 23.0)
    assert (img[:, :23] == PAD_VALUE).all() and not (img[:, 23] == PAD_VALUE).all()
    box = xywhn2xyxy(t[:, 2:].numpy().astype(np.float64), 352, 256)
    back = scale_boxes((256, 352), box, (h0, w0), ((rh, rw), (pw, ph)))
    assert np.allclose(back, [[100, 65.5, 300, 196.5]], atol=1e-3)
