"""YOLO-format datasets: data.yaml and hyp loading, label verification + cache, the detection DataLoader.

Layout (as ultralytics YOLOv5): ``data.yaml`` names image sources per split (folders, ``.txt`` lists of
image paths, or lists of either); each image ``.../images/.../x.jpg`` has its labels in
``.../labels/.../x.txt``, one ``class cx cy w h`` line (normalised to the image) per box.

Bad data never stops a run: corrupt images are skipped, bad label lines are dropped or clipped, and
everything is counted in ``dataset.stats`` and printed once as a one-line summary.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from PIL import Image

from ..errors import UserError
from ..fileio import write_json
from ..log import note, warn
from .augment import (augment_hsv, flip_lr, flip_ud, letterbox, mixup, random_perspective, xywhn2xyxy,
                      xyxy2xywhn)

IMG_FORMATS = {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"}
HYP_FILE = Path(__file__).with_name("hyp.scratch-low.yaml")
CACHE_VERSION = 1
_PROB_KEYS = ("flipud", "fliplr", "mosaic", "mixup", "copy_paste")
_MOMENTUM_KEYS = ("momentum", "warmup_momentum")
_EPS = 1e-4  # tolerance (normalised) for box edges just outside the image from rounding


# ---------------------------------------------------------------------------------------------- yaml
def _read_yaml(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file")
    try:
        d = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not valid YAML ({msg})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a YAML mapping of keys, got {type(d).__name__}")
    return d


def load_hyp(path=None) -> dict:
    """Training hyperparameters: the shipped hyp.scratch-low.yaml defaults, overridden by ``path``.

    ``path`` is a YAML file, the name of a shipped one (``adamw-fast`` for compress/data/hyp.adamw-fast.yaml)
    or a dict (or None for the defaults). Unknown keys, non-numbers, negative
    values and probabilities above 1 raise UserError naming the file and key.
    """
    hyp = {k: float(v) for k, v in _read_yaml(HYP_FILE, "hyp").items()}
    if path is None:
        return hyp
    if isinstance(path, dict):
        user, src = path, "hyp"
    else:
        shipped = HYP_FILE.parent / f"hyp.{path}.yaml"
        if not Path(path).is_file() and shipped.is_file():
            path = shipped  # a shipped name, e.g. --hyp adamw-fast
        user, src = _read_yaml(path, "hyp"), str(path)
    for k, v in user.items():
        if k not in hyp:
            raise UserError(f"{src}: unknown hyp key {k!r} (known: {', '.join(hyp)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{src}: {k}: expected a finite number, got {v!r}")
        if v < 0 or (k in _PROB_KEYS and v > 1) or (k in _MOMENTUM_KEYS and v >= 1):
            span = "0..1" if k in _PROB_KEYS else "[0, 1)" if k in _MOMENTUM_KEYS else ">= 0"
            raise UserError(f"{src}: {k}: {v} is out of range ({span})")
        hyp[k] = float(v)
    return hyp


def _images_in(entry: Path, src: str) -> list[str]:
    """Image files named by one data.yaml entry: a folder (recursive), a .txt list or an image file."""
    if entry.is_dir():
        return sorted(str(p) for p in entry.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS and p.is_file())
    if entry.is_file() and entry.suffix.lower() == ".txt":
        files = []
        for line in entry.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(str(p if p.is_absolute() else (entry.parent / p).resolve()))
        return [f for f in files if Path(f).suffix[1:].lower() in IMG_FORMATS]
    if entry.is_file() and entry.suffix[1:].lower() in IMG_FORMATS:
        return [str(entry)]
    if entry.exists():
        raise UserError(f"{src}: {entry} is neither a folder, a .txt list nor an image")
    raise UserError(f"{src}: {entry} does not exist")


def resolve_images(value, root, src: str = "images") -> list[str]:
    """Absolute image paths for a split value (str or list of folders/.txt lists/images) under ``root``."""
    entries = value if isinstance(value, (list, tuple)) else [value]
    files = []
    for e in entries:
        if not isinstance(e, (str, os.PathLike)) or not str(e).strip():
            raise UserError(f"{src}: expected a path or a list of paths, got {e!r}")
        p = Path(e).expanduser()
        files += _images_in(p if p.is_absolute() else (Path(root) / p).resolve(), src)
    return files


def load_data_yaml(path) -> dict:
    """Read an ultralytics data.yaml; returns ``{path, train, val, [test], nc, names, yaml_file}``.

    ``train``/``val`` (and ``test`` if given) become lists of absolute image paths; ``path`` is resolved
    against the yaml's folder and the splits against ``path``. ``names`` may be a list or a
    ``{index: name}`` dict and comes back as a list. Raises UserError naming the file and key on a missing
    file, bad YAML, a missing or empty split, or ``nc``/``names`` that disagree.
    """
    path = Path(path)
    d = _read_yaml(path, "data")
    root = Path(d.get("path") or ".").expanduser()
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    out = {"path": str(root), "yaml_file": str(path)}
    for key in ("train", "val", "test"):
        if key == "test" and not d.get(key):
            continue
        if not d.get(key):
            raise UserError(f"{path}: key {key!r} is missing or empty")
        files = resolve_images(d[key], root, f"{path}: {key}")
        if not files:
            raise UserError(f"{path}: {key}: no images found in {d[key]}")
        out[key] = files
    names = d.get("names")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise UserError(f"{path}: names: dict keys must be class indices 0..nc-1") from None
        if keys != list(range(len(keys))):
            raise UserError(f"{path}: names: dict keys must be class indices 0..nc-1, got {keys}")
        names = [str(names[k] if k in names else names[str(k)]) for k in keys]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    elif names is not None:
        raise UserError(f"{path}: names: expected a list or a dict, got {type(names).__name__}")
    nc = d.get("nc", len(names) if names else None)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise UserError(f"{path}: nc: expected a positive integer, got {nc!r}")
    if names is None:
        names = [f"class{i}" for i in range(nc)]
    if len(names) != nc:
        raise UserError(f"{path}: nc is {nc} but names has {len(names)} entries")
    out.update(nc=nc, names=names)
    return out


# ------------------------------------------------------------------------------------- label checks
def img2label_paths(img_paths) -> list[str]:
    """Label file of each image: the last ``/images/`` becomes ``/labels/`` and the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [sb.join(x.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt" for x in map(str, img_paths)]


def _new_counts() -> dict:
    return dict(corrupt=0, missing_labels=0, empty_labels=0, malformed=0, out_of_range=0, duplicates=0)


def _check_image(im_file: str):
    """(h, w) of a readable image (EXIF rotation applied), or a string saying why it is unusable."""
    try:
        with Image.open(im_file) as im:
            im.verify()  # must come straight after open; the image is reopened to read it
        with Image.open(im_file) as im:
            w, h = im.size
            fmt = (im.format or "").lower()
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation with a 90-degree turn
                w, h = h, w
    except Exception as e:  # PIL raises many types for unreadable files
        return f"unreadable ({type(e).__name__})"
    if fmt not in IMG_FORMATS:
        return f"unsupported format {fmt!r}"
    if h < 10 or w < 10:
        return f"too small ({w}x{h})"
    if fmt in ("jpeg", "mpo"):
        with open(im_file, "rb") as f:
            f.seek(-2, 2)
            if f.read() != b"\xff\xd9" and cv2.imread(im_file) is None:  # truncated and not decodable
                return "truncated JPEG"
    return (h, w)


def _parse_labels(lb_file: str, counts: dict) -> np.ndarray:
    """Valid (n, 5) labels of one file; bad lines are dropped or clipped and counted in ``counts``."""
    try:
        text = Path(lb_file).read_text()
    except FileNotFoundError:
        counts["missing_labels"] += 1
        return np.zeros((0, 5), np.float32)
    except (OSError, UnicodeDecodeError):
        counts["malformed"] += 1
        return np.zeros((0, 5), np.float32)
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            v = np.array([float(x) for x in parts])
        except ValueError:
            counts["malformed"] += 1
            continue
        if len(v) >= 7 and len(v) % 2 == 1:  # a segment: class x1 y1 x2 y2 ... -> its box
            xy = v[1:].reshape(-1, 2)
            lo, hi = xy.min(0), xy.max(0)
            v = np.array([v[0], *(lo + hi) / 2, *(hi - lo)])
        if len(v) != 5 or not np.isfinite(v).all() or v[0] < 0 or v[0] != int(v[0]) or (v[3:] <= 0).any():
            counts["malformed"] += 1
            continue
        x1, y1, x2, y2 = v[1] - v[3] / 2, v[2] - v[4] / 2, v[1] + v[3] / 2, v[2] + v[4] / 2
        if min(x1, y1) < -_EPS or max(x2, y2) > 1 + _EPS:
            counts["out_of_range"] += 1
            x1, y1, x2, y2 = (min(max(c, 0.0), 1.0) for c in (x1, y1, x2, y2))
            if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:  # nothing left inside the image
                continue
            v = np.array([v[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        rows.append(v)
    if not text.strip():
        counts["empty_labels"] += 1
    if not rows:
        return np.zeros((0, 5), np.float32)
    lb = np.round(np.stack(rows), 6).astype(np.float32)
    _, first = np.unique(lb, axis=0, return_index=True)
    if len(first) < len(lb):
        counts["duplicates"] += len(lb) - len(first)
        lb = lb[np.sort(first)]
    return lb


def _verify(args) -> tuple[dict, dict]:
    im_file, lb_file = args
    counts = _new_counts()
    shape = _check_image(im_file)
    if isinstance(shape, str):
        counts["corrupt"] += 1
        return {"error": shape}, counts
    lb = _parse_labels(lb_file, counts)
    return {"shape": list(shape), "labels": lb.tolist()}, counts


def _files_hash(im_files, label_files) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for f in (*im_files, *label_files):
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0-\n".encode())
    return h.hexdigest()


def cache_path(label_files) -> Path:
    """Where the label cache of these files lives: ``<first label folder>.cache.json`` beside it."""
    d = Path(label_files[0]).parent
    return d.parent / f"{d.name}.cache.json"


def load_labels(im_files, label_files, use_cache: bool = True) -> tuple[list[dict], dict, str]:
    """Verify every image and parse its labels, reusing the JSON cache when its hash still matches.

    Returns ``(records, counts, how)``: one record per image (``{"shape": [h, w], "labels": [...]}`` or
    ``{"error": why}``), the summed counts, and ``how`` = "cache reused", "cache written" or "no cache".
    """
    digest = _files_hash(im_files, label_files)
    cp = cache_path(label_files)
    if use_cache and cp.is_file():
        try:
            c = json.loads(cp.read_text())
            if c.get("version") == CACHE_VERSION and c.get("hash") == digest:
                return c["records"], c["counts"], "cache reused"
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # a broken cache is rebuilt
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        results = list(ex.map(_verify, zip(im_files, label_files)))
    records = [r for r, _ in results]
    counts = _new_counts()
    for _, c in results:
        for k, v in c.items():
            counts[k] += v
    how = "no cache"
    if use_cache:
        try:
            write_json(cp, {"version": CACHE_VERSION, "hash": digest, "counts": counts, "records": records})
            how = "cache written"
        except OSError as e:
            how = f"cache not written ({e.strerror or type(e).__name__})"
    return records, counts, how


def _missing_labels_text(stats: dict) -> str:
    """How many images had no label file at all (for messages about empty label sets)."""
    return f"{stats.get('missing_labels', 0)} of {stats.get('images', 0)} images have no label file"


# ------------------------------------------------------------------------------------------ dataset
def rect_batch_shapes(shapes_hw, batch_size: int, imgsz: int, stride: int = 32, pad: float = 0.0):
    """Rectangular batches as YOLOv5's val loader builds them (``rect=True``).

    ``shapes_hw`` (n, 2) original image sizes (h, w). Images are ordered by aspect ratio h / w (stable:
    equal ratios keep their order) and cut into consecutive batches of ``batch_size``. A batch of images
    all wider than tall gets the shape (max ratio, 1) * ``imgsz``, one of images all taller than wide
    (1, 1 / min ratio) * ``imgsz``, any other batch (1, 1) * ``imgsz``; each side then becomes
    ``ceil(side / stride + pad) * stride`` (so with ``pad=0.5`` square images at 320 get 352 x 352).

    Returns ``(order, batch_shapes, batch_index)``: the image indices in the new order, the (nb, 2) int
    (h, w) shape of each batch and the batch of each image in the new order.
    """
    hw = np.asarray(shapes_hw, np.float64).reshape(-1, 2)
    order = np.argsort(hw[:, 0] / hw[:, 1], kind="stable")
    ar = (hw[:, 0] / hw[:, 1])[order]
    batch_index = np.arange(len(ar)) // batch_size
    rel = np.ones((-(-len(ar) // batch_size), 2))  # (h, w) of each batch relative to imgsz
    for b in range(len(rel)):
        a = ar[batch_index == b]
        if a.max() < 1:
            rel[b] = a.max(), 1
        elif a.min() > 1:
            rel[b] = 1, 1 / a.min()
    batch_shapes = np.ceil(rel * imgsz / stride + pad).astype(int) * stride
    return order, batch_shapes, batch_index


class YoloDataset(torch.utils.data.Dataset):
    """Images and labels of one split, letterboxed to ``imgsz``; with ``augment``, mosaic + affine + HSV + flips.

    An item is ``(img uint8 (3, H, W) RGB, targets (n, 6) [0, class, cx, cy, w, h], path, shapes)`` with
    boxes normalised to the returned image; ``shapes = ((h0, w0), ((ratio_h, ratio_w), (pad_w, pad_h)))``
    maps them back to the original image, or None for a mosaic. Indexing with ``(i, epoch)`` (what
    :class:`YoloSampler` yields) draws the augmentation from a generator seeded by (seed, epoch, i), so a
    run is reproducible whatever the number of workers.

    H x W is imgsz x imgsz, or with ``rect`` (validation only) the shape of the image's batch from
    :func:`rect_batch_shapes` (``batch_size``, ``stride``, ``pad``): images are then reordered by aspect
    ratio, resized so the long side is ``imgsz`` and padded (grey 114, never enlarged) to their batch
    shape, as YOLOv5 val.py's loader does.

    Attributes: ``im_files``, ``label_files``, ``labels`` (list of float32 (n, 5) class cx cy w h),
    ``shapes`` (n, 2) original (h, w), ``stats`` (the counts of the summary line), ``summary``, and with
    ``rect`` ``batch_shapes`` ((nb, 2) h, w) and ``batch_index`` (the batch of each image).
    """

    def __init__(self, img_files, imgsz=640, augment=False, hyp=None, nc=None, prefix="", seed=0,
                 cache=True, verbose=True, rect=False, batch_size=16, stride=32, pad=0.0):
        if isinstance(img_files, (str, os.PathLike)):
            img_files = resolve_images(img_files, ".")
        img_files = [str(f) for f in img_files]
        if not img_files:
            raise UserError(f"{prefix}no image files given")
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 32:
            raise UserError(f"--imgsz {imgsz}: must be an integer >= 32")
        if rect and augment:
            raise UserError("--rect batches are for validation only (no augmentation)")
        self.imgsz, self.augment, self.seed, self.prefix = imgsz, bool(augment), int(seed), prefix
        self.rect, self.batch_shapes, self.batch_index = bool(rect), None, None
        self.hyp = load_hyp(hyp)
        label_files = img2label_paths(img_files)
        records, counts, how = load_labels(img_files, label_files, cache)
        self.im_files, self.label_files, self.labels, shapes, errors = [], [], [], [], []
        bad_class = boxes = 0
        for im, lb, r in zip(img_files, label_files, records):
            if "error" in r:
                errors.append(f"{im}: {r['error']}")
                continue
            lab = np.array(r["labels"], np.float32).reshape(-1, 5)
            if nc is not None and len(lab):
                ok = lab[:, 0] < nc
                bad_class += int((~ok).sum())
                lab = lab[ok]
            self.im_files.append(im)
            self.label_files.append(lb)
            self.labels.append(lab)
            shapes.append(r["shape"])
            boxes += len(lab)
        self.shapes = np.array(shapes, np.int64).reshape(-1, 2)
        background = sum(1 for lab in self.labels if not len(lab))
        self.stats = dict(images=len(self.im_files), boxes=boxes, background=background, bad_class=bad_class,
                          **counts)
        self.summary = self._summary(how, errors)
        if verbose:
            print(self.summary)
        if not self.im_files:
            raise UserError(f"{prefix}none of the {len(img_files)} images is readable ({errors[0]})")
        if verbose and not boxes:
            warn(f"{prefix}no label file holds a box: all {len(self.im_files)} images are background, so a "
                 f"detector learns nothing from them and mAP is 0; check that labels/ mirrors images/ with one "
                 f"'class cx cy w h' line per box ({_missing_labels_text(self.stats)})")
        if self.rect:
            order, self.batch_shapes, self.batch_index = rect_batch_shapes(self.shapes, batch_size, imgsz,
                                                                           stride, pad)
            self.im_files = [self.im_files[i] for i in order]
            self.label_files = [self.label_files[i] for i in order]
            self.labels = [self.labels[i] for i in order]
            self.shapes = self.shapes[order]
        if self.augment and self.hyp["copy_paste"] and verbose:
            note(f"{prefix}hyp copy_paste needs segment labels; these box labels are used as they are")

    def _summary(self, how, errors) -> str:
        s = self.stats
        parts = [f"{s['images']} images, {s['boxes']} boxes"]
        if s["background"]:
            parts.append(f"{s['background']} background ({s['missing_labels']} without a label file)")
        dropped = [f"{s[k]} {name}" for k, name in (("malformed", "malformed"), ("bad_class", "class>=nc"),
                                                    ("duplicates", "duplicate")) if s[k]]
        if dropped:
            parts.append("dropped " + ", ".join(dropped) + " label lines")
        if s["out_of_range"]:
            parts.append(f"clipped {s['out_of_range']} out-of-range boxes")
        if s["corrupt"]:
            parts.append(f"skipped {s['corrupt']} corrupt images (e.g. {errors[0]})")
        return f"{self.prefix}{'; '.join(parts)} [{how}]"

    def __len__(self):
        return len(self.im_files)

    def load_image(self, i):
        """BGR image ``i`` resized so its long side is ``imgsz``; returns (img, (h0, w0), (h, w)).

        Sides are rounded to the nearest pixel, or with ``rect`` truncated as YOLOv5's loader does (up to
        release v7.0; master since 2022-12 rounds up): val.py's model must see the same pixels (a 1-pixel
        difference on some images moved mAP@0.5 by 0.006 on a 64-image set).
        """
        im = cv2.imread(self.im_files[i])
        if im is None:  # passed verification but cannot be decoded now: a blank image, no boxes
            print(f"{self.prefix}warning: {self.im_files[i]} could not be decoded; using a blank image",
                  file=sys.stderr)
            self.labels[i] = np.zeros((0, 5), np.float32)
            h0, w0 = (int(v) for v in self.shapes[i])
            im = np.full((h0, w0, 3), 114, np.uint8)
        h0, w0 = im.shape[:2]
        r = self.imgsz / max(h0, w0)
        if r != 1:
            side = int if self.rect else round
            size = (min(max(side(w0 * r), 1), self.imgsz), min(max(side(h0 * r), 1), self.imgsz))
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, size, interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def _affine_kw(self):
        h = self.hyp
        return dict(degrees=h["degrees"], translate=h["translate"], scale=h["scale"], shear=h["shear"],
                    perspective=h["perspective"])

    def load_mosaic(self, index, rng):
        """Four images around a random centre of a 2*imgsz canvas, then a random affine back to imgsz.

        Returns (BGR image imgsz x imgsz, labels (n, 5) class x1 y1 x2 y2 in pixels).
        """
        s = self.imgsz
        xc, yc = (int(v) for v in rng.uniform(s / 2, 3 * s / 2, 2))
        indices = [index, *(int(i) for i in rng.integers(0, len(self), 3))]
        canvas = np.full((2 * s, 2 * s, 3), 114, np.uint8)
        labels = []
        for k, i in enumerate(indices):
            im, _, (h, w) = self.load_image(i)
            x0 = xc - w if k in (0, 2) else xc  # quadrants: top-left, top-right, bottom-left, bottom-right
            y0 = yc - h if k in (0, 1) else yc
            dx1, dy1, dx2, dy2 = max(x0, 0), max(y0, 0), min(x0 + w, 2 * s), min(y0 + h, 2 * s)
            canvas[dy1:dy2, dx1:dx2] = im[dy1 - y0:dy2 - y0, dx1 - x0:dx2 - x0]
            lab = self.labels[i].copy()
            if len(lab):
                lab[:, 1:] = xywhn2xyxy(lab[:, 1:], w, h, padw=x0, padh=y0)
            labels.append(lab)
        labels = np.concatenate(labels, 0)
        np.clip(labels[:, 1:], 0, 2 * s, out=labels[:, 1:])
        return random_perspective(canvas, labels, rng, out_shape=(s, s), **self._affine_kw())

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        hyp = self.hyp
        if self.augment and rng.random() < hyp["mosaic"]:
            img, labels = self.load_mosaic(index, rng)
            shapes = None
            if rng.random() < hyp["mixup"]:
                img2, labels2 = self.load_mosaic(int(rng.integers(0, len(self))), rng)
                img, labels = mixup(img, labels, img2, labels2, rng)
        else:
            img, (h0, w0), (h, w) = self.load_image(index)
            shape = tuple(self.batch_shapes[self.batch_index[index]]) if self.rect else self.imgsz
            img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0 * ratio[1], w / w0 * ratio[0]), pad)
            labels = self.labels[index].copy()
            if len(labels):
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
            if self.augment:
                img, labels = random_perspective(img, labels, rng, **self._affine_kw())
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0])
        if self.augment:
            augment_hsv(img, rng, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
            if rng.random() < hyp["flipud"]:
                img, labels = flip_ud(img, labels)
            if rng.random() < hyp["fliplr"]:
                img, labels = flip_lr(img, labels)
        targets = torch.zeros((len(labels), 6))
        if len(labels):
            targets[:, 1:] = torch.from_numpy(np.asarray(labels, np.float32))
        img = np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), targets, self.im_files[index], shapes

    @staticmethod
    def collate_fn(batch):
        """Stack images; concatenate targets with column 0 set to the image's index in the batch."""
        imgs, targets, paths, shapes = zip(*batch)
        for i, t in enumerate(targets):
            t[:, 0] = i
        return torch.stack(imgs, 0), torch.cat(targets, 0), list(paths), list(shapes)


class YoloSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)``: a seeded permutation per epoch (or the plain order), split across DDP ranks.

    Each ``iter()`` uses the current epoch and then advances it; ``set_epoch`` sets it explicitly (as with
    torch's DistributedSampler). With ``world_size > 1`` the order is padded by repeating its start so
    every rank gets the same number of items, and rank ``r`` takes items ``r, r + world_size, ...``.
    """

    def __init__(self, n, shuffle=False, seed=0, rank=-1, world_size=1):
        if world_size < 1 or (world_size > 1 and not 0 <= rank < world_size):
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, int(seed), 0
        self.rank, self.world_size = max(rank, 0), world_size

    def set_epoch(self, epoch: int):
        """Use this epoch for the next iteration (its shuffle order and augmentation)."""
        self.epoch = int(epoch)

    def __len__(self):
        return -(-self.n // self.world_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            total = len(self) * self.world_size
            order = (order * (total // self.n + 1))[:total][self.rank::self.world_size]
        return iter([(i, epoch) for i in order])


def _worker_init(worker_id):
    cv2.setNumThreads(0)  # the workers are the parallelism; OpenCV threads would oversubscribe the CPU
    torch.set_num_threads(1)


def create_dataloader(img_files, imgsz, batch_size, *, augment, hyp=None, workers=0, shuffle=False, seed=0,
                      rank=-1, world_size=1, nc=None, prefix="", cache=True, rect=False, pad=0.0, stride=32):
    """A DataLoader of ``(imgs, targets, paths, shapes)`` batches and its :class:`YoloDataset`.

    ``imgs`` uint8 (B, 3, imgsz, imgsz) RGB; ``targets`` float (N, 6) ``[batch_index, class, cx, cy, w, h]``
    normalised; ``paths`` list of str; ``shapes`` per image (see YoloDataset, None for mosaics).
    ``workers`` > 0 uses that many persistent worker processes; ``rank``/``world_size`` give each DDP
    process its share; ``seed`` fixes the shuffle order and the augmentation of every epoch.

    ``rect=True`` (validation: no augment, shuffle or DDP split) gives YOLOv5 val.py's rectangular batches:
    images in aspect-ratio order, each batch letterboxed to its own (H, W) from :func:`rect_batch_shapes`
    with this ``pad`` and ``stride`` (the model's largest stride). val.py uses ``pad=0.5``; its batch
    shapes also depend on ``batch_size``, so use the same batch size to reproduce its numbers.
    Returns ``(loader, dataset)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch {batch_size}: must be a positive integer")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"--workers {workers}: must be an integer >= 0")
    if world_size > 1 and not 0 <= rank < world_size:
        raise UserError(f"rank {rank} / world size {world_size}: need 0 <= rank < world_size")
    if rect and (shuffle or world_size > 1):
        raise UserError("--rect batches need the images in order: no shuffle and no DDP split")
    dataset = YoloDataset(img_files, imgsz, augment=augment, hyp=hyp, nc=nc, prefix=prefix, seed=seed,
                          cache=cache, rect=rect, batch_size=batch_size, stride=stride, pad=pad)
    sampler = YoloSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), sampler=sampler, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        collate_fn=YoloDataset.collate_fn, worker_init_fn=_worker_init if workers else None)
    return loader, dataset
