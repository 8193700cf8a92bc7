"""YOLOv5 loss on hand-made targets: assignment, perfect predictions, empty targets, label smoothing,
gradients, CIoU, autocast and hyp handling."""
import math

import pytest
import torch
import torch.nn.functional as F

from compress.engine.loss import LOSS_HYP_DEFAULTS, ComputeLoss, FocalLoss, scale_hyp_for_model
from compress.engine.metrics import bbox_iou
from compress.errors import UserError
from compress.model.yolo import Model

from conftest import tiny_cfg

HYP = dict(LOSS_HYP_DEFAULTS)
IMG = 64  # strides 8, 16, 32 -> grids 8x8, 4x4, 2x2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model(tiny_cfg()).train()  # nc=4, yolov5n anchors


def _zeros(model, bs=2, fill=0.0):
    det = model.model[-1]
    return [torch.full((bs, det.na, IMG // int(s), IMG // int(s), det.no), fill) for s in det.stride]


def _assignments(loss, preds, targets):
    _, tbox, indices, _ = loss.build_targets(preds, targets)
    return [sorted(zip(*(x.tolist() for x in idx))) for idx in indices], tbox


def test_assignment_cells_neighbours_and_anchor_filter(model):
    # one target in image 1: centre (0.3, 0.6), size 0.25 x 0.25 of the image
    t = torch.tensor([[1, 2, 0.3, 0.6, 0.25, 0.25]])
    loss = ComputeLoss(model, HYP)
    cells, tbox = _assignments(loss, _zeros(model), t)
    # P3 (8x8): centre (2.4, 4.8) -> cell (gi 2, gj 4); x frac 0.4 < 0.5 -> left neighbour (1, 4);
    # y frac 0.8 -> the lower neighbour (2, 5). wh (2, 2) grid units is within 4x of all 3 anchors.
    p3 = sorted((1, a, gj, gi) for a in range(3) for gi, gj in [(2, 4), (1, 4), (2, 5)])
    assert cells[0] == p3
    # P4 (4x4): centre (1.2, 2.4) -> (1, 2), left (0, 2), upper (1, 1); wh (1, 1): anchor 2 (3.69 x 7.44) is
    # more than 4x larger, so only anchors 0 and 1.
    p4 = sorted((1, a, gj, gi) for a in range(2) for gi, gj in [(1, 2), (0, 2), (1, 1)])
    assert cells[1] == p4
    # P5 (2x2): wh (0.5, 0.5) vs anchors >= 2.8 grid units: filtered out entirely
    assert cells[2] == []
    # target box relative to each assigned cell, in grid units; rows come as centre x 3 anchors, then
    # left x 3 anchors, then lower x 3 anchors
    b3 = tbox[0][[0, 3, 6]]
    assert torch.allclose(b3, torch.tensor([[0.4, 0.8, 2, 2], [1.4, 0.8, 2, 2], [0.4, -0.2, 2, 2]]), atol=1e-5)
    # a stricter anchor_t drops the anchors whose ratio exceeds it: P3 ratios are 1.6, 1.875, 2.06
    strict = ComputeLoss(model, {**HYP, "anchor_t": 1.7})
    cells, _ = _assignments(strict, _zeros(model), t)
    assert {a for _, a, _, _ in cells[0]} == {0}


def test_assignment_near_the_border_uses_no_outside_neighbour(model):
    # centre (0.05, 0.95): on P3 (0.4, 7.6) -> x frac < 0.5 but x < 1, y frac > 0.5 but 8 - y < 1:
    # neither neighbour exists, only the centre cell (0, 7)
    t = torch.tensor([[0, 0, 0.05, 0.95, 0.2, 0.2]])
    cells, _ = _assignments(ComputeLoss(model, HYP), _zeros(model), t)
    assert {(gi, gj) for _, _, gj, gi in cells[0]} == {(0, 7)}


def _perfect_preds(model, loss, targets, bs=2):
    """Logits whose decoded boxes equal the targets at every assignment, with confident obj/cls."""
    preds = _zeros(model, bs, fill=0.0)
    for p in preds:
        p[..., 4] = -20.0  # no object anywhere else
    tcls, tbox, indices, anchors = loss.build_targets(preds, targets)
    for i, p in enumerate(preds):
        b, a, gj, gi = indices[i]
        if not len(b):
            continue
        xy = torch.logit((tbox[i][:, :2] + 0.5) / 2)
        wh = torch.logit((tbox[i][:, 2:] / anchors[i]).sqrt() / 2)
        cls = torch.full((len(b), loss.nc), -20.0)
        cls[torch.arange(len(b)), tcls[i]] = 20.0
        p[b, a, gj, gi] = torch.cat((xy, wh, torch.full((len(b), 1), 20.0), cls), 1)
    return preds


def test_perfect_prediction_gives_zero_box_and_cls_loss(model):
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25], [1, 3, 0.7, 0.2, 0.4, 0.3]])
    loss = ComputeLoss(model, HYP)
    total, items = loss(_perfect_preds(model, loss, targets), targets)
    box, obj, cls = items.tolist()
    assert box < 1e-5 and cls < 1e-6 and obj < 1e-5
    assert total.item() == pytest.approx(2 * (box + obj + cls), abs=1e-6)
    # a plain (all-zero) prediction is far worse on every term
    _, bad = loss(_zeros(model), targets)
    assert (bad > 1e-2).all()


def test_no_targets_gives_objectness_only(model):
    loss = ComputeLoss(model, HYP)
    total, items = loss(_zeros(model, bs=3), torch.zeros((0, 6)))
    # every objectness logit is 0 -> BCE log 2 per cell, weighted 4.0 + 1.0 + 0.4 over the levels
    expected = math.log(2) * (4.0 + 1.0 + 0.4) * HYP["obj"]
    assert items[0] == 0 and items[2] == 0
    assert items[1].item() == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(3 * expected, rel=1e-6)


def test_label_smoothing_sets_class_targets(model):
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25]])
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])  # every prediction's class logits
    preds = _zeros(model)
    for p in preds:
        p[..., 5:] = logits
    for eps in (0.0, 0.2):
        loss = ComputeLoss(model, {**HYP, "label_smoothing": eps})
        _, _, indices, _ = loss.build_targets(preds, targets)
        levels = sum(len(idx[0]) > 0 for idx in indices)
        t = torch.full((4,), eps / 2)
        t[1] = 1 - eps / 2
        expected = F.binary_cross_entropy_with_logits(logits, t) * levels * HYP["cls"]
        assert loss(preds, targets)[1][2].item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.cp == pytest.approx(0.9) and loss.cn == pytest.approx(0.1)


def test_gradients_flow_through_the_model(model):
    model.zero_grad()
    imgs = torch.rand(2, 3, IMG, IMG)
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25], [1, 0, 0.5, 0.5, 0.6, 0.7]])
    total, items = ComputeLoss(model, HYP)(model(imgs), targets)
    assert total.requires_grad and not items.requires_grad and items.shape == (3,)
    total.backward()
    det = model.model[-1]
    params = [("first conv", model.model[0].conv.weight)] + [(f"head {i}", m.weight) for i, m in enumerate(det.m)]
    for name, p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert det.anchors.grad is None  # anchors are a buffer, never trained


def test_ciou_matches_hand_computation():
    # box1 centred (0, 0) 2x2, box2 centred (1, 0.5) 2x4 (xywh)
    b1, b2 = torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([1.0, 0.5, 2.0, 4.0])
    inter = 1.0 * 2.0  # x overlap [0, 1], y overlap [-1, 1]
    union = 4 + 8 - inter
    iou = inter / union
    c2 = 3.0 ** 2 + 4.0 ** 2  # enclosing box: x [-1, 2], y [-1.5, 2.5]
    rho2 = 1.0 ** 2 + 0.5 ** 2  # squared centre distance
    v = 4 / math.pi ** 2 * (math.atan(2 / 4) - math.atan(2 / 2)) ** 2
    alpha = v / (v - iou + 1)
    assert float(bbox_iou(b1, b2)) == pytest.approx(iou, abs=1e-6)
    assert float(bbox_iou(b1, b2, CIoU=True)) == pytest.approx(iou - rho2 / c2 - alpha * v, abs=1e-6)
    assert float(bbox_iou(b1, b2, DIoU=True)) == pytest.approx(iou - rho2 / c2, abs=1e-6)
    assert float(bbox_iou(b1, b2, GIoU=True)) == pytest.approx(iou - (12 - union) / 12, abs=1e-6)
    # same boxes as xyxy
    x1 = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    x2 = torch.tensor([0.0, -1.5, 2.0, 2.5])
    assert float(bbox_iou(x1, x2, xywh=False, CIoU=True)) == pytest.approx(iou - rho2 / c2 - alpha * v, abs=1e-6)


def test_autocast_computes_in_float32(model):
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25]])
    imgs = torch.rand(2, 3, IMG, IMG)
    loss = ComputeLoss(model, HYP)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(imgs)
        assert preds[0].dtype == torch.bfloat16
        total, items = loss(preds, targets)
    assert total.dtype == torch.float32 and items.dtype == torch.float32
    ref_total, ref_items = loss([p.detach().float() for p in preds], targets)
    assert torch.allclose(items, ref_items) and torch.allclose(total, ref_total)
    total.backward()
    assert model.model[-1].m[0].weight.grad is not None


def test_detect_head_or_wrapper_gives_the_same_loss(model):
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25]])
    preds = [p.normal_(generator=torch.Generator().manual_seed(1)) for p in _zeros(model)]
    a = ComputeLoss(model, HYP)(preds, targets)[1]
    b = ComputeLoss(model.model[-1], HYP)(preds, targets)[1]
    wrapped = torch.nn.Module()
    wrapped.module = model  # as DataParallel / DDP hold it
    c = ComputeLoss(wrapped, HYP)(preds, targets)[1]
    assert torch.equal(a, b) and torch.equal(a, c)


def test_single_class_model_has_no_class_loss():
    m = Model(tiny_cfg(nc=1)).train()
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.3]])
    items = ComputeLoss(m, HYP)(m(torch.rand(1, 3, IMG, IMG)), targets)[1]
    assert items[2] == 0 and items[0] > 0


def test_focal_loss_and_pos_weight():
    pred, true = torch.tensor([3.0, -2.0, 0.1]), torch.tensor([1.0, 0.0, 1.0])
    fl = FocalLoss(torch.nn.BCEWithLogitsLoss(), gamma=2.0, alpha=0.25)
    p = torch.sigmoid(pred)
    p_t = true * p + (1 - true) * (1 - p)
    alpha_t = true * 0.25 + (1 - true) * 0.75
    bce = F.binary_cross_entropy_with_logits(pred, true, reduction="none")
    assert fl(pred, true).item() == pytest.approx((bce * alpha_t * (1 - p_t) ** 2).mean().item(), rel=1e-6)


def test_focal_and_obj_pw_change_the_loss(model):
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25]])
    preds = _zeros(model)
    base = ComputeLoss(model, HYP)(preds, targets)[1]
    focal = ComputeLoss(model, {**HYP, "fl_gamma": 1.5})(preds, targets)[1]
    assert focal[1] < base[1] and focal[2] < base[2] and focal[0] == base[0]
    heavy = ComputeLoss(model, {**HYP, "obj_pw": 3.0})(preds, targets)[1]
    assert heavy[1] > base[1] and heavy[2] == base[2]


def test_hyp_checks_and_scaling():
    with pytest.raises(UserError, match="anchor_t"):
        ComputeLoss(Model(tiny_cfg()), {k: v for k, v in HYP.items() if k != "anchor_t"})
    with pytest.raises(UserError, match="'box' must be a number"):
        ComputeLoss(Model(tiny_cfg()), {**HYP, "box": "big"})
    h = scale_hyp_for_model({**HYP, "lr0": 0.01}, nl=3, nc=4, imgsz=320)
    assert h["box"] == pytest.approx(0.05)
    assert h["cls"] == pytest.approx(0.5 * 4 / 80)
    assert h["obj"] == pytest.approx(1.0 * 0.25)
    assert h["lr0"] == 0.01 and HYP["cls"] == 0.5  # other keys kept, input not modified
    h4 = scale_hyp_for_model(HYP, nl=4, nc=80, imgsz=640)
    assert h4["box"] == pytest.approx(0.05 * 0.75) and h4["obj"] == pytest.approx(0.75)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_on_cuda_with_cpu_targets():
    m = Model(tiny_cfg()).cuda().train()
    loss = ComputeLoss(m, HYP)  # built after the move; anchors are read per call anyway
    targets = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25]])
    with torch.autocast("cuda", dtype=torch.float16):
        total, items = loss(m(torch.rand(2, 3, IMG, IMG, device="cuda")), targets)
    assert total.device.type == "cuda" and total.dtype == torch.float32 and torch.isfinite(items).all()
    total.backward()
