"""The YOLOv5 (v6.x) training loss: CIoU box loss, BCE objectness with IoU targets, BCE classification.

Hyperparameters (``hyp`` dict, ultralytics names): ``box``, ``obj``, ``cls`` (loss gains), ``cls_pw``,
``obj_pw`` (BCE positive weights), ``anchor_t`` (max anchor/target width-height ratio), optional
``fl_gamma`` (focal loss when > 0, default 0) and ``label_smoothing`` (default 0).

The gains are used as given. ultralytics' train.py first rescales them for the model and data; do the
same with :func:`scale_hyp_for_model` before building :class:`ComputeLoss`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from ..model.yolo import detect_head
from .metrics import bbox_iou

REQUIRED_HYP = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t")
# ultralytics hyp.scratch-low.yaml values of the loss keys, for callers that need defaults.
LOSS_HYP_DEFAULTS = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0,
                     "fl_gamma": 0.0, "label_smoothing": 0.0}
# Objectness loss weight per level, small strides first (ultralytics' balance).
BALANCE = {3: [4.0, 1.0, 0.4]}
BALANCE_DEFAULT = [4.0, 1.0, 0.25, 0.06, 0.02]
# Neighbour-cell offsets: the centre cell, then left, up, right, down (x, y); scaled by g = 0.5.
_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32) * 0.5


def scale_hyp_for_model(hyp: dict, nl: int, nc: int, imgsz: int) -> dict:
    """A copy of ``hyp`` with the loss gains scaled as ultralytics' train.py does.

    box *= 3 / nl; cls *= nc / 80 * 3 / nl; obj *= (imgsz / 640) ** 2 * 3 / nl — so the defaults, tuned for
    3 levels, 80 classes and 640 px, keep their balance for other models, datasets and image sizes.
    """
    h = dict(hyp)
    h["box"] = float(h["box"]) * 3 / nl
    h["cls"] = float(h["cls"]) * nc / 80 * 3 / nl
    h["obj"] = float(h["obj"]) * (imgsz / 640) ** 2 * 3 / nl
    return h


def _check_hyp(hyp: dict) -> dict:
    missing = [k for k in REQUIRED_HYP if k not in hyp]
    if missing:
        raise UserError(f"hyp: missing loss key(s) {', '.join(missing)} (defaults: "
                        + ", ".join(f"{k}={LOSS_HYP_DEFAULTS[k]}" for k in missing) + ")")
    out = {}
    for k in (*REQUIRED_HYP, "fl_gamma", "label_smoothing"):
        v = hyp.get(k, LOSS_HYP_DEFAULTS[k])
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"hyp: '{k}' must be a number, got {v!r}")
        out[k] = float(v)
    if out["anchor_t"] <= 1:
        raise UserError(f"hyp: 'anchor_t' must be > 1, got {out['anchor_t']}")
    if not 0 <= out["label_smoothing"] < 1:
        raise UserError(f"hyp: 'label_smoothing' must be in [0, 1), got {out['label_smoothing']}")
    return out


class FocalLoss(nn.Module):
    """Focal loss wrapped around ``BCEWithLogitsLoss``: BCE * alpha_t * (1 - p_t) ** gamma, then mean."""

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma, self.alpha = gamma, alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"  # the focal factor is applied per element

    def forward(self, pred, true):
        loss = self.loss_fcn(pred, true)
        p = torch.sigmoid(pred)
        p_t = true * p + (1 - true) * (1 - p)
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_t * (1.0 - p_t) ** self.gamma
        return loss.mean() if self.reduction == "mean" else loss.sum() if self.reduction == "sum" else loss


class ComputeLoss:
    """YOLOv5 v6 loss for a model's Detect head.

    ``ComputeLoss(model, hyp)`` reads ``na``, ``nc``, ``nl`` and ``anchors`` (nl, na, 2, in grid units)
    from ``model.model[-1]`` (``model`` may also be a DDP wrapper or the Detect module: build it from the
    float model before QAT tracing). The anchors are read at each call, so moving the model to another
    device or re-fitting anchors afterwards is fine.

    ``loss(preds, targets)``: ``preds`` is the train-mode output, a list of ``nl`` tensors
    (B, na, ny, nx, 5 + nc) of raw logits; ``targets`` is (N, 6) ``[image_index, class, cx, cy, w, h]`` with
    the box normalised to the input image. Returns ``(loss * B, loss_items)``: a scalar to backpropagate and
    the detached tensor ``[box, obj, cls]`` (each already multiplied by its gain, before the batch factor).
    Everything is computed in float32, also under ``torch.autocast``.

    Target assignment: each target goes to every anchor whose width and height ratios to it are within
    ``anchor_t`` (both ways), at its own cell and at the two neighbouring cells nearest to its centre
    (offset 0.5). Box loss = mean (1 - CIoU) over assignments; objectness target = the detached CIoU
    (clamped >= 0) at assigned cells, 0 elsewhere, BCE per level weighted by BALANCE; classification =
    BCE against label-smoothed one-hot targets (1 - eps/2 and eps/2), skipped when nc == 1.
    """

    def __init__(self, model, hyp: dict):
        self.hyp = _check_hyp(hyp)
        det = detect_head(model)
        self.det = det
        self.na, self.nc, self.nl = int(det.na), int(det.nc), int(det.nl)
        self.balance = BALANCE.get(self.nl, BALANCE_DEFAULT)
        if self.nl > len(self.balance):
            raise ValueError(f"ComputeLoss supports up to {len(self.balance)} detection levels, got {self.nl}")
        eps = self.hyp["label_smoothing"]
        self.cp, self.cn = 1.0 - 0.5 * eps, 0.5 * eps  # positive / negative class targets
        self.gr = 1.0  # objectness target = gr * IoU + (1 - gr)
        self._crit = {}  # BCE criteria per device

    def _criteria(self, device):
        if device in self._crit:
            return self._crit[device]
        h = self.hyp
        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["cls_pw"]], device=device))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["obj_pw"]], device=device))
        if h["fl_gamma"] > 0:
            bce_cls, bce_obj = FocalLoss(bce_cls, h["fl_gamma"]), FocalLoss(bce_obj, h["fl_gamma"])
        self._crit[device] = bce_cls, bce_obj
        return bce_cls, bce_obj

    def __call__(self, preds, targets):
        """Loss of train-mode ``preds`` against ``targets``; see the class docstring."""
        if len(preds) != self.nl:
            raise ValueError(f"expected {self.nl} prediction levels, got {len(preds)}")
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be (N, 6) [image, class, cx, cy, w, h], got {tuple(targets.shape)}")
        device = preds[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            preds = [p.float() for p in preds]
            targets = targets.to(device=device, dtype=torch.float32)
            return self._loss(preds, targets)

    def _loss(self, preds, targets):
        device = preds[0].device
        bce_cls, bce_obj = self._criteria(device)
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        tcls, tbox, indices, anchors = self.build_targets(preds, targets)
        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anchors[i]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], CIoU=True)
                lbox = lbox + (1.0 - iou).mean()
                iou = iou.detach().clamp(0)
                tobj[b, a, gj, gi] = (1.0 - self.gr) + self.gr * iou
                if self.nc > 1:
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(n, device=device), tcls[i]] = self.cp
                    lcls = lcls + bce_cls(pcls, t)
            lobj = lobj + bce_obj(pi[..., 4], tobj) * self.balance[i]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.stack((lbox, lobj, lcls)).detach()

    def build_targets(self, preds, targets):
        """Assign targets to (image, anchor, cell) per level.

        Returns four lists of ``nl`` entries: ``tcls`` (n,) class indices; ``tbox`` (n, 4) target
        (x, y) relative to the assigned cell's corner (in [-0.5, 1.5)) and (w, h), in grid units;
        ``indices`` tuples ``(b, a, gj, gi)`` of image, anchor, row, column; ``anchors`` (n, 2) the
        assigned anchors in grid units.
        """
        device = targets.device
        na, nt = self.na, targets.shape[0]
        all_anchors = self.det.anchors.to(device=device, dtype=torch.float32)
        tcls, tbox, indices, anch = [], [], [], []
        gain = torch.ones(7, device=device)
        ai = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).repeat(1, nt)
        t_all = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)  # (na, nt, 7): target + anchor index
        off = _OFFSETS.to(device)
        g = 0.5
        for i in range(self.nl):
            anchors, shape = all_anchors[i], preds[i].shape
            gain[2:6] = torch.tensor(shape, device=device, dtype=torch.float32)[[3, 2, 3, 2]]  # xywh -> grid
            t = t_all * gain
            if nt:
                r = t[..., 4:6] / anchors[:, None]  # wh ratio to each anchor
                t = t[torch.max(r, 1 / r).max(2)[0] < self.hyp["anchor_t"]]
                gxy = t[:, 2:4]  # from the left / top
                gxi = gain[[2, 3]] - gxy  # from the right / bottom
                j, k = ((gxy % 1 < g) & (gxy > 1)).T
                l, m = ((gxi % 1 < g) & (gxi > 1)).T
                j = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[j]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[j]
            else:
                t = t_all[0]
                offsets = 0
            bc, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - offsets).long()
            gi = gij[:, 0].clamp(0, shape[3] - 1)  # only a centre exactly on the far edge is clamped
            gj = gij[:, 1].clamp(0, shape[2] - 1)
            gij = torch.stack((gi, gj), 1)
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch
