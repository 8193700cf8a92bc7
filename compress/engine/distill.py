"""Knowledge-distillation losses for YOLOv5 heads and the maps that feed them.

Two published terms, both computed on the same (augmented) batch the detection loss sees:

- **Output distillation, objectness-weighted** (Mehta & Ozturk, "Object detection at 200 frames per
  second", 2018): the student's objectness follows the teacher's on every anchor; its class scores and
  boxes follow the teacher's only where the teacher sees an object (each anchor weighted by the teacher's
  objectness), so the background that fills most anchors does not drown the terms that carry the boxes.
  The three parts use the detection loss's own gains and level balance, so ``weight 1`` weighs the teacher
  like the labels.
- **Channel-wise distillation** (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction",
  ICCV 2021) on each map feeding Detect: every channel's activation map becomes a distribution over its
  positions (softmax with temperature ``tau``); the student's follows the teacher's by KL divergence,
  times ``tau**2``, averaged over channels and images. A student of another width maps its channels to
  the teacher's through a 1x1 conv per level (:class:`FeatureAdapters`), trained with the student and not
  part of it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import bbox_iou

# Scale of the channel-wise term: CWD's KL (averaged over channels, summed over levels) is ~9x the detection
# loss at the start of fine-tuning a pruned yolov5n and ~2.5x at its end (benchmarks/distill.py); this
# brings the two near one footing at weight 1, as the output term is.
FEATURE_GAIN = 0.1
_EPS = 1e-7


def binary_kl(student_logit: torch.Tensor, teacher_prob: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bernoulli(teacher) || Bernoulli(sigmoid(student))): 0 where the two agree."""
    t = teacher_prob.clamp(_EPS, 1 - _EPS)
    entropy = -(t * t.log() + (1 - t) * (1 - t).log())
    return F.binary_cross_entropy_with_logits(student_logit, t, reduction="none") - entropy


def _boxes(raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(..., 4) xywh in grid units relative to the cell, decoded as the YOLOv5 loss decodes them."""
    p = raw[..., :4].sigmoid()
    xy = p[..., :2] * 2 - 0.5
    wh = (p[..., 2:4] * 2) ** 2 * anchors.view(1, -1, 1, 1, 2)
    return torch.cat((xy, wh), -1)


def output_distill_loss(student: list, teacher: list, anchors: torch.Tensor, gains: dict, balance) -> tuple:
    """Objectness-weighted output distillation of raw Detect outputs; returns ``(obj, cls, box)`` terms.

    ``student``/``teacher``: per level (B, na, ny, nx, 5 + nc) raw logits (train-mode Detect outputs) of
    models with the same anchors (``anchors``: nl x na x 2, grid units). ``gains``: the detection loss's
    ``obj``/``cls``/``box`` gains; ``balance``: its per-level objectness weights. Per level: objectness =
    mean binary KL over all anchors (x balance); classes (binary KL per class) and box (1 - CIoU of the
    decoded boxes): averages over the anchors of all levels weighted by the teacher's objectness.
    """
    dev = student[0].device
    lobj, lcls, lbox, wsum = (torch.zeros((), device=dev) for _ in range(4))
    for i, (s, t) in enumerate(zip(student, teacher)):
        s, t = s.float(), t.detach().float()
        tp = t.sigmoid()
        w = tp[..., 4]
        lobj = lobj + binary_kl(s[..., 4], w).mean() * balance[i]
        wsum = wsum + w.sum()
        if s.shape[-1] > 6:  # more than one class
            lcls = lcls + (binary_kl(s[..., 5:], tp[..., 5:]).mean(-1) * w).sum()
        a = anchors[i].to(dev, torch.float32)
        lbox = lbox + ((1 - bbox_iou(_boxes(s, a), _boxes(t, a), CIoU=True)) * w).sum()
    # one weighted average over the anchors of all levels: a level where the teacher sees only background
    # weighs (almost) nothing
    wsum = wsum.clamp_min(_EPS)
    lcls, lbox = lcls / wsum, lbox / wsum
    return lobj * gains["obj"], lcls * gains["cls"], lbox * gains["box"]


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation of one (B, C, H, W) map: KL of per-channel spatial softmaxes x tau^2,
    averaged over the B x C channel maps (student and teacher of the same shape)."""
    b, c, h, w = teacher.shape
    t = F.softmax(teacher.detach().float().reshape(b * c, h * w) / tau, dim=1)
    log_s = F.log_softmax(student.float().reshape(b * c, h * w) / tau, dim=1)
    return (t * (t.clamp_min(1e-12).log() - log_s)).sum(1).mean() * tau ** 2


class FeatureAdapters(nn.Module):
    """One 1x1 conv per distilled level from the student's width to the teacher's (identity where equal)."""

    def __init__(self, student_channels, teacher_channels):
        super().__init__()
        self.m = nn.ModuleList(nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1)
                               for cs, ct in zip(student_channels, teacher_channels))

    def forward(self, feats):
        return [m(x) for m, x in zip(self.m, feats)]
