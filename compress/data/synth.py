"""A synthetic YOLO-format detection dataset: shapes of distinct form on cluttered, noisy backgrounds.

Classes differ by shape (disc, square, triangle, ring, cross), never by colour alone: every object gets a
random colour, size (about 4 % to 40 % of the image side), aspect ratio and, for the polygons, rotation.
Objects may overlap, but a new object is only placed where it leaves every earlier one at least
``MIN_VISIBLE`` of its pixels visible, so every object in an image is labelled and none is mostly hidden.
Each label is the tight box of the whole object (its visible part plus the occluded rest).

Every image is drawn from its own random generator seeded by (seed, split, index): the same seed gives
the same bytes, whatever else was generated before.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..errors import UserError
from ..fileio import write_yaml
from .shapes import SHAPES

MIN_VISIBLE = 0.6  # fraction of an object's pixels that must stay visible after later objects are drawn
SYNTH_VERSION = 1
_SPLITS = {"train": 0, "val": 1}
_SHIFT = 4  # sub-pixel bits for cv2.fillPoly


def _unit_polygons(kind: str, rng) -> list[np.ndarray]:
    """Contours of a shape in a unit frame (extent about [-1, 1]); several contours make holes (ring)."""
    if kind in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        circle = np.stack([np.cos(t), np.sin(t)], 1)
        if kind == "disc":
            return [circle]
        return [circle, circle * rng.uniform(0.45, 0.65)]
    if kind == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)]
    if kind == "triangle":
        apex = rng.uniform(-0.6, 0.6)  # not always isosceles
        return [np.array([[apex, -1], [1, 1], [-1, 1]], float)]
    if kind == "cross":
        a = rng.uniform(0.25, 0.4)  # half arm thickness
        return [np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                          [-a, a], [-1, a], [-1, -a], [-a, -a]], float)]
    raise ValueError(kind)


def _object_contours(kind: str, size: float, rng) -> list[np.ndarray]:
    """Contours of one object centred at (0, 0): random aspect ratio and rotation, longest side ~ size."""
    polys = _unit_polygons(kind, rng)
    aspect = np.exp(rng.uniform(-0.45, 0.45))  # width/height between ~0.64 and ~1.57
    sx, sy = aspect ** 0.5, aspect ** -0.5
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    out = [(p * [sx, sy]) @ rot.T for p in polys]
    ext = np.abs(np.concatenate(out)).max(0).max()
    return [p * (size / 2 / ext) for p in out]


def _background(h: int, w: int, rng) -> np.ndarray:
    """A textured BGR background: gradient + smooth colour blotches + soft blobs + random lines (uint8).

    The smooth parts are built on a grid 8x smaller and upsampled once, which keeps synthesis fast.
    """
    lh, lw = max(h // 8, 4), max(w // 8, 4)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    t = np.cos(ang) * xx / lw + np.sin(ang) * yy / lh
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    low = c1.astype(np.float32) + t[..., None] * (c2 - c1).astype(np.float32)
    g = int(rng.integers(3, 9))  # colour blotches: a small random grid upsampled smoothly
    low += cv2.resize(rng.uniform(-70, 70, (g, g, 3)).astype(np.float32), (lw, lh),
                      interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 4))):  # soft blobs (blurred, so never mistaken for a disc)
        blob = np.zeros((lh, lw), np.float32)
        ctr = (int(rng.integers(0, lw)), int(rng.integers(0, lh)))
        ax = (int(rng.integers(1, lw // 5 + 2)), int(rng.integers(1, lh // 5 + 2)))
        cv2.ellipse(blob, ctr, ax, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), max(ax) / 2.5 + 0.5)[..., None]
        low = low * (1 - 0.7 * blob) + rng.uniform(0, 255, 3).astype(np.float32) * 0.7 * blob
    img = cv2.resize(np.clip(low, 0, 255), (w, h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    for _ in range(int(rng.integers(2, 9))):  # clutter lines
        p1 = rng.integers(0, [w, h])
        p2 = p1 + rng.integers(-w // 2, w // 2 + 1, 2)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(img, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), col,
                 int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def _contrast_colour(patch: np.ndarray, rng) -> np.ndarray:
    """A random colour that stands out from the mean of the background patch it is drawn on."""
    mean = patch.reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(8):
        col = rng.uniform(0, 255, 3)
        d = float(np.abs(col - mean).sum())
        if d > 150:
            return col
        if d > best_d:
            best, best_d = col, d
    return best


def synth_image(imgsz: int, classes: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image (BGR uint8, imgsz x imgsz) and its labels (n, 5): class, cx, cy, w, h normalised."""
    h = w = imgsz
    img = _background(h, w, rng)
    owner = np.full((h, w), -1, np.int16)  # which object each pixel shows (-1 = background)
    visible, total, boxes = [], [], []
    smin, smax = max(0.04 * imgsz, 8.0), 0.4 * imgsz
    n_obj = int(rng.integers(1, 9))
    for _ in range(n_obj):
        cls = int(rng.integers(0, classes))
        for _try in range(10):
            size = float(np.exp(rng.uniform(np.log(smin), np.log(smax))))
            polys = _object_contours(SHAPES[cls], size, rng)
            pts = np.concatenate(polys)
            lo, hi = pts.min(0), pts.max(0)
            cx = rng.uniform(-lo[0], w - hi[0])
            cy = rng.uniform(-lo[1], h - hi[1])
            x0, y0 = int(np.floor(cx + lo[0])), int(np.floor(cy + lo[1]))
            x1, y1 = min(int(np.ceil(cx + hi[0])) + 1, w), min(int(np.ceil(cy + hi[1])) + 1, h)
            x0, y0 = max(x0, 0), max(y0, 0)
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillPoly(mask, [np.round((p + [cx - x0, cy - y0]) * (1 << _SHIFT)).astype(np.int32)
                                for p in polys], 1, cv2.LINE_8, _SHIFT)
            m = mask.astype(bool)
            area = int(m.sum())
            if area < 16:
                continue
            under = owner[y0:y1, x0:x1][m]
            lost = np.bincount(under[under >= 0], minlength=len(visible))
            if all(visible[j] - lost[j] >= MIN_VISIBLE * total[j] for j in range(len(visible))):
                break
        else:
            continue  # no placement keeps the others visible: fewer objects in this image
        for j in range(len(visible)):
            visible[j] -= int(lost[j])
        k = len(visible)
        visible.append(area)
        total.append(area)
        owner[y0:y1, x0:x1][m] = k
        ys, xs = np.nonzero(m)
        bx0, bx1, by0, by1 = x0 + xs.min(), x0 + xs.max() + 1, y0 + ys.min(), y0 + ys.max() + 1
        boxes.append([cls, (bx0 + bx1) / 2 / w, (by0 + by1) / 2 / h, (bx1 - bx0) / w, (by1 - by0) / h])
        # fill with a shaded colour so objects are not flat stickers
        col = _contrast_colour(img[y0:y1, x0:x1], rng).astype(np.float32)
        gy, gx = np.mgrid[0:y1 - y0, 0:x1 - x0].astype(np.float32)
        d = rng.uniform(-1, 1, 2) * 0.35 / max(size, 1.0)
        shade = 1.0 + d[0] * (gx - gx.mean()) + d[1] * (gy - gy.mean())
        fill = np.clip(col * shade[..., None], 0, 255)
        img[y0:y1, x0:x1][m] = fill[m].astype(np.uint8)
    sigma = rng.uniform(2.0, 14.0)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= sigma
    noise += img
    img = np.clip(noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # some images slightly soft, as from a cheap lens
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    labels = np.array(boxes, np.float64).reshape(-1, 5)
    return img, labels


def _is_synth_dir(out: Path) -> bool:
    """True when ``out`` holds a dataset written by this module (safe to replace)."""
    try:
        d = yaml.safe_load((out / "data.yaml").read_text())
        return isinstance(d, dict) and isinstance(d.get("synth"), dict)
    except (OSError, yaml.YAMLError):
        return False


def make_synthetic_dataset(out, n_train: int = 800, n_val: int = 200, imgsz: int = 320, classes: int = 4,
                           seed: int = 0, fmt: str = "jpg") -> Path:
    """Write a YOLO-format dataset (images/{train,val}, labels/{train,val}, data.yaml) under ``out``.

    Returns the path of ``data.yaml``. The same arguments give byte-identical files. data.yaml is written
    last (and removed first when an earlier synthetic dataset is replaced), so an interrupted run never
    leaves a data.yaml pointing at a half-written dataset. A non-empty ``out`` that is not an earlier
    synthetic dataset is refused.
    """
    if not 1 <= int(classes) <= len(SHAPES):
        raise UserError(f"--classes {classes}: must be 1..{len(SHAPES)} ({', '.join(SHAPES)})")
    if int(n_train) < 1 or int(n_val) < 1:
        raise UserError(f"--train {n_train} / --val {n_val}: each split needs at least 1 image")
    if not 32 <= int(imgsz) <= 4096:
        raise UserError(f"--imgsz {imgsz}: must be 32..4096")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise UserError(f"--seed {seed}: must be an integer in 0..{2 ** 32 - 1}")
    if fmt not in ("jpg", "png"):
        raise UserError(f"image format {fmt!r}: must be jpg or png")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not _is_synth_dir(out):
            raise UserError(f"--out {out}: directory is not empty and holds no synthetic dataset")
        (out / "data.yaml").unlink()
        for sub in ("images", "labels"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for cache in out.glob("*.cache*"):
            cache.unlink()
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    for split, n in (("train", int(n_train)), ("val", int(n_val))):
        idir, ldir = out / "images" / split, out / "labels" / split
        idir.mkdir(parents=True, exist_ok=True)
        ldir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([int(seed), _SPLITS[split], i])
            img, labels = synth_image(int(imgsz), int(classes), rng)
            ok, buf = cv2.imencode(f".{fmt}", img, params)
            if not ok:  # pragma: no cover - cv2 always encodes a uint8 image
                raise RuntimeError("image encoding failed")
            (idir / f"{i:06d}.{fmt}").write_bytes(buf.tobytes())
            (ldir / f"{i:06d}.txt").write_text(
                "".join(f"{int(c)} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in labels))
    data = {"path": ".", "train": "images/train", "val": "images/val", "nc": int(classes),
            "names": list(SHAPES[:int(classes)]),
            "synth": {"version": SYNTH_VERSION, "seed": int(seed), "imgsz": int(imgsz),
                      "n_train": int(n_train), "n_val": int(n_val)}}
    write_yaml(out / "data.yaml", data)
    return out / "data.yaml"
