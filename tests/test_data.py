"""Data layer: synthetic dataset, data.yaml/hyp loading, bad-data stats, loaders, augmentation, cache, CLI."""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from compress.cli import main
from compress.data import (YoloSampler, create_dataloader, letterbox, load_data_yaml, load_hyp,
                           make_synthetic_dataset, scale_boxes)
from compress.data.augment import xywhn2xyxy
from compress.data.dataset import YoloDataset, cache_path
from compress.errors import UserError

NO_AUG = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0,
              perspective=0.0, flipud=0.0, fliplr=0.0, mosaic=0.0, mixup=0.0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic dataset shared by the loader tests."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=12, n_val=4, imgsz=96,
                                  classes=5, seed=3)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- synth
def test_synth_is_deterministic(tmp_path):
    a = _tree(make_synthetic_dataset(tmp_path / "a", 4, 2, imgsz=64, seed=0).parent)
    b = _tree(make_synthetic_dataset(tmp_path / "b", 4, 2, imgsz=64, seed=0).parent)
    c = _tree(make_synthetic_dataset(tmp_path / "c", 4, 2, imgsz=64, seed=1).parent)
    assert a == b
    assert len(a) == 4 + 2 + 4 + 2 + 1
    assert a.keys() == c.keys()
    diff = [k for k in a if k.startswith("images/") and a[k] != c[k]]
    assert len(diff) == 6


def test_synth_labels_are_valid(synth):
    root = synth.parent
    d = yaml.safe_load(synth.read_text())
    assert d["nc"] == 5 and d["names"] == ["disc", "square", "triangle", "ring", "cross"]
    n_obj, classes = [], set()
    for split, n in (("train", 12), ("val", 4)):
        imgs = sorted((root / "images" / split).iterdir())
        assert len(imgs) == n
        for im in imgs:
            assert cv2.imread(str(im)).shape == (96, 96, 3)
            lb = np.loadtxt(root / "labels" / split / f"{im.stem}.txt", ndmin=2)
            assert 1 <= len(lb) <= 8
            n_obj.append(len(lb))
            classes |= set(lb[:, 0].astype(int).tolist())
            assert ((lb[:, 0] >= 0) & (lb[:, 0] < 5)).all()
            x1, y1 = lb[:, 1] - lb[:, 3] / 2, lb[:, 2] - lb[:, 4] / 2
            x2, y2 = lb[:, 1] + lb[:, 3] / 2, lb[:, 2] + lb[:, 4] / 2
            assert (x1 >= -1e-6).all() and (y1 >= -1e-6).all() and (x2 <= 1 + 1e-6).all() and (y2 <= 1 + 1e-6).all()
            assert (lb[:, 3:] * 96 >= 3).all() and (lb[:, 3:] <= 0.45).all()  # no specks, no giants
    assert len(set(n_obj)) > 1 and len(classes) >= 4


def test_synth_bad_options_and_replace(tmp_path):
    with pytest.raises(UserError, match="--classes 6"):
        make_synthetic_dataset(tmp_path / "x", 2, 1, imgsz=64, classes=6)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_synthetic_dataset(tmp_path / "foreign", 2, 1, imgsz=64)
    out = tmp_path / "again"
    make_synthetic_dataset(out, 5, 2, imgsz=64)
    make_synthetic_dataset(out, 2, 1, imgsz=64)  # replacing an earlier synthetic set drops its stale files
    assert len(list((out / "images" / "train").iterdir())) == 2
    assert len(list((out / "labels" / "train").iterdir())) == 2


def test_interrupted_synth_leaves_no_data_yaml(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    make_synthetic_dataset(out, 2, 1, imgsz=64)
    calls = []

    def failing_encode(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_encode(*a, **k)

    real_encode = cv2.imencode
    monkeypatch.setattr("compress.data.synth.cv2.imencode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(out, 4, 2, imgsz=64)
    assert not (out / "data.yaml").exists()


# --------------------------------------------------------------------------------------- data.yaml
def test_load_data_yaml_forms(synth, tmp_path):
    root = synth.parent
    d = load_data_yaml(synth)
    assert len(d["train"]) == 12 and len(d["val"]) == 4 and d["nc"] == 5 and len(d["names"]) == 5
    assert all(os.path.isabs(f) and f.endswith(".jpg") for f in d["train"])
    # .txt lists (relative lines are relative to the list), lists of folders and lists, names as a dict,
    # and `path` relative to the yaml's folder
    tr = sorted((root / "images" / "train").iterdir())
    (root / "some.txt").write_text("".join(f"./images/train/{p.name}\n" for p in tr[:5]) + f"{tr[5]}\n")
    cfg = tmp_path / "cfg" / "d.yaml"
    cfg.parent.mkdir()
    rel = os.path.relpath(root, cfg.parent)
    cfg.write_text(yaml.safe_dump({"path": rel, "train": ["some.txt", "images/val"], "val": "some.txt",
                                   "names": {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}}))
    d2 = load_data_yaml(cfg)
    assert d2["train"] == [str(p) for p in tr[:6]] + d["val"]
    assert len(d2["val"]) == 6 and d2["nc"] == 5 and d2["names"] == ["a", "b", "c", "d", "e"]
    assert d2["path"] == str(root)


@pytest.mark.parametrize("content,match", [
    (None, "no such data file"),
    ("train: [unclosed", "not valid YAML"),
    ("path: R\ntrain: images/train\nnc: 5\n", "'val' is missing"),
    ("path: R\ntrain: images/train\nval: images/nothere\nnc: 5\n", "val: .*does not exist"),
    ("path: R\ntrain: images/train\nval: E\nnc: 5\n", "val: no images found"),
    ("path: R\ntrain: images/train\nval: images/val\nnc: 3\nnames: [a, b]\n", "nc is 3 but names has 2"),
])
def test_load_data_yaml_errors(synth, tmp_path, content, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    y = tmp_path / "bad.yaml"
    if content is not None:
        y.write_text(content.replace("R", str(synth.parent)).replace("E", str(tmp_path / "empty")))
    with pytest.raises(UserError, match=match) as e:
        load_data_yaml(y)
    assert "bad.yaml" in str(e.value)


def test_load_hyp(tmp_path):
    h = load_hyp()
    assert h["lr0"] == 0.01 and h["momentum"] == 0.937 and h["mosaic"] == 1.0 and h["label_smoothing"] == 0.0
    assert len(h) == 29
    f = tmp_path / "hyp.yaml"
    f.write_text("lr0: 0.02\nmosaic: 0\n")
    h2 = load_hyp(f)
    assert h2["lr0"] == 0.02 and h2["mosaic"] == 0.0 and h2["momentum"] == 0.937
    f.write_text("lr0: 0.02\nlr_zero: 1\n")
    with pytest.raises(UserError, match=r"hyp.yaml: unknown hyp key 'lr_zero'"):
        load_hyp(f)
    with pytest.raises(UserError, match="fliplr"):
        load_hyp({"fliplr": 1.5})
    with pytest.raises(UserError, match="lr0: expected a finite number"):
        load_hyp({"lr0": "fast"})


# ------------------------------------------------------------------------------------------ bad data
def _write_bad_dataset(root: Path) -> list[str]:
    idir, ldir = root / "images" / "train", root / "labels" / "train"
    idir.mkdir(parents=True)
    ldir.mkdir(parents=True)
    im = np.full((48, 64, 3), 80, np.uint8)
    labels = {
        "good": "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.2\n0 0.5 0.5 0.2 0.2\n",  # + 1 duplicate
        "range": "1 0.95 0.5 0.2 0.2\n2 0.5 0.5 0.3 0.3\n0 1.5 1.5 0.1 0.1\n",  # 1 clipped, 1 fully outside
        "cls": "7 0.5 0.5 0.2 0.2\n3 0.4 0.4 0.2 0.2\n",  # class 7 >= nc
        "nolabel": None,  # background
        "empty": "",  # background
        "junk": "0 0.5 0.5 0.2\nx y z w h\n0 0.5 0.5 0.0 0.2\n-1 0.5 0.5 0.1 0.1\n1 0.5 0.5 0.4 0.4\n",
    }
    for name, text in labels.items():
        cv2.imwrite(str(idir / f"{name}.png"), im)
        if text is not None:
            (ldir / f"{name}.txt").write_text(text)
    (idir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (ldir / "corrupt.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return sorted(str(p) for p in idir.iterdir())


def test_bad_data_is_counted_not_fatal(tmp_path, capsys):
    files = _write_bad_dataset(tmp_path)
    loader, ds = create_dataloader(files, 64, 8, augment=True, nc=4, prefix="train: ")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("train: 6 images")
    assert "corrupt.jpg" in out[0]
    s = ds.stats
    assert (s["images"], s["corrupt"], s["missing_labels"], s["empty_labels"]) == (6, 1, 1, 1)
    assert (s["duplicates"], s["out_of_range"], s["bad_class"], s["malformed"]) == (1, 2, 1, 4)
    assert s["boxes"] == 2 + 2 + 1 + 1 and s["background"] == 2
    rng_lab = ds.labels[ds.im_files.index(str(tmp_path / "images/train/range.png"))]
    assert np.allclose(rng_lab[0], [1, 0.925, 0.5, 0.15, 0.2], atol=1e-6)  # clipped to the image
    imgs, targets, paths, _ = next(iter(loader))
    assert imgs.shape == (6, 3, 64, 64) and len(paths) == 6


def test_all_images_corrupt_is_a_user_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match="none of the 1 images is readable"):
        YoloDataset([str(tmp_path / "images" / "a.jpg")], 64, verbose=False)


# --------------------------------------------------------------------------------------------- loaders
def test_train_and_val_batches(synth):
    d = load_data_yaml(synth)
    loader, ds = create_dataloader(d["train"], 96, 4, augment=True, shuffle=True, seed=1, nc=d["nc"])
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.dtype == torch.uint8 and imgs.shape == (4, 3, 96, 96)
    assert targets.dtype == torch.float32 and targets.shape[1] == 6 and len(targets) > 0
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2, 3}
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all() and (targets[:, 1] < 5).all()
    assert isinstance(paths, list) and all(isinstance(p, str) and p in ds.im_files for p in paths)
    assert len(shapes) == 4 and len(loader) == 3
    # every geometric/photometric option on at once (rotation, shear, perspective, mixup) stays well-formed
    hyp = {"degrees": 20.0, "shear": 5.0, "perspective": 0.0005, "mixup": 1.0, "flipud": 0.5}
    loader, _ = create_dataloader(d["train"], 96, 4, augment=True, hyp=hyp, shuffle=True, seed=1, nc=d["nc"])
    for imgs, targets, _, _ in loader:
        assert imgs.shape[1:] == (3, 96, 96) and targets.shape[1] == 6
        assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all() and (targets[:, 4:] > 0).all()
    vloader, vds = create_dataloader(d["val"], 96, 4, augment=False, nc=d["nc"])
    imgs, targets, paths, shapes = next(iter(vloader))
    assert paths == vds.im_files  # no shuffle
    (h0, w0), ((rh, rw), (pw, ph)) = shapes[0]
    assert (h0, w0) == (96, 96) and (rh, rw) == (1.0, 1.0) and (pw, ph) == (0.0, 0.0)
    n0 = len(vds.labels[0])
    assert torch.allclose(targets[targets[:, 0] == 0][:, 1:], torch.from_numpy(vds.labels[0]), atol=1e-6)
    assert len(targets) == sum(len(lb) for lb in vds.labels) and n0 > 0


def test_fliplr_only_mirrors_boxes(synth):
    d = load_data_yaml(synth)
    plain = YoloDataset(d["train"][:3], 96, augment=False, verbose=False)
    flip = YoloDataset(d["train"][:3], 96, augment=True, hyp={**NO_AUG, "fliplr": 1.0}, verbose=False)
    for i in range(3):
        im0, t0, _, _ = plain[i]
        im1, t1, _, _ = flip[i]
        assert torch.equal(im1, im0.flip(-1))
        assert torch.allclose(t1[:, 2], 1 - t0[:, 2], atol=1e-6)
        assert torch.allclose(t1[:, [1, 3, 4, 5]], t0[:, [1, 3, 4, 5]], atol=1e-6)


def test_mosaic_affine_keeps_boxes_on_objects(tmp_path):
    """Black images with white rectangles: after mosaic + scale + translate + flips, boxes cover the white."""
    idir = tmp_path / "images"
    ldir = tmp_path / "labels"
    idir.mkdir()
    ldir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        h, w = (64, 80) if i % 2 else (80, 64)
        im = np.zeros((h, w, 3), np.uint8)
        lines = []
        for _ in range(2):
            bw, bh = rng.integers(12, 24, 2)
            x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
            im[y:y + bh, x:x + bw] = 255
            lines.append(f"0 {(x + bw / 2) / w} {(y + bh / 2) / h} {bw / w} {bh / h}\n")
        cv2.imwrite(str(idir / f"{i}.png"), im)
        (ldir / f"{i}.txt").write_text("".join(lines))
    hyp = {**NO_AUG, "mosaic": 1.0, "scale": 0.3, "translate": 0.1, "fliplr": 0.5, "flipud": 0.5}
    ds = YoloDataset(str(idir), 96, augment=True, hyp=hyp, verbose=False)
    outside = total = 0
    for i in range(len(ds)):
        for epoch in range(3):
            img, t, _, shapes = ds[(i, epoch)]
            assert shapes is None and img.shape == (3, 96, 96)
            white = img[0].numpy() > 200
            covered = np.zeros_like(white)
            for _, _, cx, cy, bw, bh in t.tolist():
                x1, y1, x2, y2 = (cx - bw / 2) * 96, (cy - bh / 2) * 96, (cx + bw / 2) * 96, (cy + bh / 2) * 96
                covered[max(int(y1) - 2, 0):int(y2) + 3, max(int(x1) - 2, 0):int(x2) + 3] = True
                inner = white[int(y1) + 2:int(y2) - 1, int(x1) + 2:int(x2) - 1]
                if inner.size >= 9:
                    assert inner.mean() > 0.9  # the box sits on its rectangle
            outside += int((white & ~covered).sum())
            total += int(white.sum())
    assert total > 0 and outside / total < 0.05  # white outside boxes: only slivers of dropped boxes


def test_letterbox_scale_boxes_round_trip():
    im = np.zeros((50, 80, 3), np.uint8)
    out, ratio, pad = letterbox(im, 64)
    assert out.shape == (64, 64, 3) and pad == (0.0, 12.0)
    boxes0 = np.array([[3.0, 4.0, 40.0, 30.0], [0.0, 0.0, 80.0, 50.0]])
    boxes1 = boxes0.copy()
    boxes1[:, [0, 2]] = boxes1[:, [0, 2]] * ratio[0] + pad[0]
    boxes1[:, [1, 3]] = boxes1[:, [1, 3]] * ratio[1] + pad[1]
    back = scale_boxes((64, 64), boxes1.copy(), (50, 80), ratio_pad=((ratio[1], ratio[0]), pad))
    assert np.allclose(back, boxes0, atol=1e-6)
    back2 = scale_boxes((64, 64), torch.tensor(boxes1), (50, 80))
    assert torch.allclose(back2, torch.tensor(boxes0), atol=1e-6)


def test_val_shapes_map_targets_back_to_original(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((75, 150, 3), np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.25 0.5 0.2 0.4\n1 0.7 0.3 0.3 0.2\n")
    loader, ds = create_dataloader([str(tmp_path / "images" / "a.png")], 64, 1, augment=False)
    imgs, targets, _, shapes = next(iter(loader))
    boxes = xywhn2xyxy(targets[:, 2:].numpy().astype(np.float64), 64, 64)
    back = scale_boxes(imgs.shape[2:], boxes, shapes[0][0], shapes[0][1])
    want = xywhn2xyxy(ds.labels[0][:, 1:].astype(np.float64), 150, 75)
    assert np.allclose(back, want, atol=1e-3)


def test_label_cache_written_and_reused(synth):
    d = load_data_yaml(synth)
    files = d["val"]
    cp = cache_path([f.replace("/images/", "/labels/") for f in files])
    cp.unlink(missing_ok=True)
    ds1 = YoloDataset(files, 96, verbose=False)
    assert cp.is_file() and ds1.summary.endswith("[cache written]")
    ds2 = YoloDataset(files, 96, verbose=False)
    assert ds2.summary.endswith("[cache reused]")
    assert all(np.array_equal(a, b) for a, b in zip(ds1.labels, ds2.labels))
    lb = Path(ds1.label_files[0])
    old = lb.read_text()
    try:
        lb.write_text("0 0.5 0.5 0.25 0.25\n")
        ds3 = YoloDataset(files, 96, verbose=False)
        assert ds3.summary.endswith("[cache written]")
        assert np.allclose(ds3.labels[0], [[0, 0.5, 0.5, 0.25, 0.25]])
    finally:
        lb.write_text(old)


def test_sampler_shuffle_ddp_and_workers(synth):
    s = YoloSampler(10, shuffle=True, seed=5)
    e0, e1 = list(s), list(s)
    assert sorted(i for i, _ in e0) == list(range(10)) and [i for i, _ in e0] != [i for i, _ in e1]
    s2 = YoloSampler(10, shuffle=True, seed=5)
    assert list(s2) == e0
    parts = [list(YoloSampler(10, shuffle=True, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert all(len(p) == 4 for p in parts) and {i for p in parts for i, _ in p} == set(range(10))
    d = load_data_yaml(synth)
    batches = []
    for workers in (0, 1):
        loader, _ = create_dataloader(d["train"][:6], 96, 3, augment=True, shuffle=True, seed=2,
                                      workers=workers)
        batches.append([b[:2] for b in loader])
    for (i0, t0), (i1, t1) in zip(*batches):
        assert torch.equal(i0, i1) and torch.equal(t0, t1)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_data_synth(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--train", "3", "--val", "2", "--imgsz", "64",
                 "--classes", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "data.yaml") in printed and "3 train + 2 val" in printed
    d = load_data_yaml(out / "data.yaml")
    assert len(d["train"]) == 3 and d["names"] == ["disc", "square"]
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--classes", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--classes 9" in err[0]
    assert not (tmp_path / "x").exists()
    assert main(["data", "check", "--data", str(out / "data.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "train: 3 images" in printed and "val: 2 images" in printed and "square" in printed
