"""Image geometry and augmentation for detection: letterbox, box mapping, random affine, HSV, flips.

Boxes are numpy arrays; ``xyxy`` boxes are in pixels, ``xywhn`` boxes are (cx, cy, w, h) normalised to
the image. Random functions take a ``numpy.random.Generator`` so a whole batch is reproducible.
Images are BGR uint8 (OpenCV order) until the dataset turns them into RGB tensors.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

PAD_VALUE = 114  # grey used for letterbox borders and mosaic/affine fill, as in ultralytics


def letterbox(im, new_shape=640, color=(PAD_VALUE,) * 3, auto=False, scaleup=True, stride=32):
    """Resize ``im`` keeping its aspect ratio and pad it to ``new_shape`` (int or (h, w)).

    Returns ``(image, (ratio_w, ratio_h), (pad_w, pad_h))`` where the pads are per side (half of the total
    padding, possibly fractional). ``auto`` pads only to a multiple of ``stride``; ``scaleup=False`` never
    enlarges the image.
    """
    shape = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = (int(round(shape[1] * r)), int(round(shape[0] * r)))  # (w, h)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (shape[1], shape[0]) != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if top or bottom or left or right:
        im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    # the actual per-axis scale, so scale_boxes inverts the rounding above exactly
    ratio = (new_unpad[0] / shape[1], new_unpad[1] / shape[0])
    return im, ratio, (float(left), float(top))


def clip_boxes(boxes, shape):
    """Clip xyxy ``boxes`` (tensor or array, in place) to an image of ``shape`` (h, w)."""
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, shape[1])
        boxes[..., 1].clamp_(0, shape[0])
        boxes[..., 2].clamp_(0, shape[1])
        boxes[..., 3].clamp_(0, shape[0])
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, shape[1])
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, shape[0])
    return boxes


def scale_boxes(img1_shape, boxes, img0_shape, ratio_pad=None):
    """Map xyxy ``boxes`` from a letterboxed image of ``img1_shape`` (h, w) back to ``img0_shape`` (h, w).

    ``ratio_pad`` is ``((ratio_h, ratio_w), (pad_w, pad_h))`` as in a val batch's ``shapes[i][1]``; without
    it the letterbox gain and padding are recomputed from the two shapes. Modifies ``boxes`` in place, clips
    them to the original image and returns them.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        gain_h = gain_w = gain
        pad = ((img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2)
    else:
        (gain_h, gain_w), pad = ratio_pad
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., [0, 2]] /= gain_w
    boxes[..., [1, 3]] /= gain_h
    return clip_boxes(boxes, img0_shape)


def xywhn2xyxy(x, w, h, padw=0.0, padh=0.0):
    """Normalised (cx, cy, w, h) -> pixel (x1, y1, x2, y2) on an image of ``w`` x ``h`` offset by the pads."""
    y = np.empty_like(x)
    y[:, 0] = w * (x[:, 0] - x[:, 2] / 2) + padw
    y[:, 1] = h * (x[:, 1] - x[:, 3] / 2) + padh
    y[:, 2] = w * (x[:, 0] + x[:, 2] / 2) + padw
    y[:, 3] = h * (x[:, 1] + x[:, 3] / 2) + padh
    return y


def xyxy2xywhn(x, w, h):
    """Pixel (x1, y1, x2, y2) -> normalised (cx, cy, w, h) on an image of ``w`` x ``h``."""
    y = np.empty_like(x)
    y[:, 0] = (x[:, 0] + x[:, 2]) / 2 / w
    y[:, 1] = (x[:, 1] + x[:, 3]) / 2 / h
    y[:, 2] = (x[:, 2] - x[:, 0]) / w
    y[:, 3] = (x[:, 3] - x[:, 1]) / h
    return y


def augment_hsv(im, rng, hgain=0.5, sgain=0.5, vgain=0.5):
    """Random hue/saturation/value jitter of a BGR uint8 image, in place (gains are +/- fractions)."""
    if not (hgain or sgain or vgain):
        return im
    r = rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=r.dtype)
    lut_h = ((x * r[0]) % 180).astype(np.uint8)  # OpenCV hue is 0..179
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)
    return im


def box_candidates(box1, box2, wh_thr=2, ar_thr=20, area_thr=0.1, eps=1e-16):
    """Which boxes survive an augmentation: box1 before (4, n), box2 after (4, n), both xyxy pixels.

    A box is kept when it is wider and taller than ``wh_thr`` px, keeps more than ``area_thr`` of its
    (scaled) area and its aspect ratio stays below ``ar_thr``.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_perspective(im, targets, rng, degrees=0.0, translate=0.0, scale=0.0, shear=0.0,
                       perspective=0.0, out_shape=None):
    """Random rotation/scale/shear/translation/perspective of ``im`` and its boxes.

    ``targets`` is (n, 5): class, x1, y1, x2, y2 in pixels of ``im``. The centre of ``im`` goes to the
    centre of the output (of ``out_shape`` (h, w), default the input's), shifted by up to ``translate`` of
    its size: a mosaic passes imgsz to crop its 2x canvas back. Boxes are transformed by their corners,
    clipped and filtered with :func:`box_candidates`.
    """
    height, width = out_shape if out_shape is not None else im.shape[:2]
    C = np.eye(3)  # move the centre to the origin
    C[0, 2], C[1, 2] = -im.shape[1] / 2, -im.shape[0] / 2
    P = np.eye(3)
    P[2, 0], P[2, 1] = rng.uniform(-perspective, perspective, 2)
    R = np.eye(3)
    a, s = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    R[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=a, scale=s)
    S = np.eye(3)
    S[0, 1], S[1, 0] = (math.tan(v * math.pi / 180) for v in rng.uniform(-shear, shear, 2))
    T = np.eye(3)
    T[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    T[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height
    M = T @ S @ R @ P @ C
    if (height, width) != im.shape[:2] or (M != np.eye(3)).any():
        fill = (PAD_VALUE,) * 3
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(width, height), borderValue=fill)
        else:
            im = cv2.warpAffine(im, M[:2], dsize=(width, height), borderValue=fill)
    n = len(targets)
    if n:
        xy = np.ones((n * 4, 3))
        xy[:, :2] = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # the 4 corners of each box
        xy = xy @ M.T
        xy = (xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]).reshape(n, 8)
        x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
        new = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
        clip_boxes(new, (height, width))
        keep = box_candidates(targets[:, 1:5].T * s, new.T, area_thr=0.10)
        targets = targets[keep]
        targets[:, 1:5] = new[keep]
    return im, targets


def mixup(im, labels, im2, labels2, rng):
    """Blend two images of the same shape (ratio ~ Beta(32, 32)) and keep both sets of labels."""
    r = rng.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)


def flip_lr(im, labels_xywhn):
    """Mirror an image left-right and its normalised (n, 5) labels (class, cx, cy, w, h)."""
    labels_xywhn[:, 1] = 1 - labels_xywhn[:, 1]
    return np.ascontiguousarray(np.fliplr(im)), labels_xywhn


def flip_ud(im, labels_xywhn):
    """Mirror an image up-down and its normalised (n, 5) labels (class, cx, cy, w, h)."""
    labels_xywhn[:, 2] = 1 - labels_xywhn[:, 2]
    return np.ascontiguousarray(np.flipud(im)), labels_xywhn
