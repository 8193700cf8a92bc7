"""Safe import of ultralytics YOLOv5 checkpoints (whole pickled modules) without running pickled code.

The checkpoints are made here: fake ``models/common.py`` and ``models/yolo.py`` packages whose classes
subclass compress's blocks but pickle as ``models.common.Conv``, ``models.yolo.Detect``,
``models.yolo.Model`` ... exactly like real ultralytics checkpoints; the fake package is removed from
``sys.path``/``sys.modules`` before loading, so nothing can import it back.
"""
from __future__ import annotations

import builtins
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from compress import load_model
from compress.cli import main
from compress.errors import UserError
from compress.model import blocks
from compress.model.ultralytics_ckpt import load_checkpoint
from compress.model.yolo import Model

from conftest import tiny_cfg

FAKE_COMMON = """
from compress.model import blocks as _b
class Conv(_b.Conv): pass
class Bottleneck(_b.Bottleneck): pass
class C3(_b.C3): pass
class SPPF(_b.SPPF): pass
class SPP(_b.SPP): pass
class Focus(_b.Focus): pass
class Concat(_b.Concat): pass
"""
FAKE_YOLO = """
from compress.model import blocks as _b, yolo as _y
class Detect(_b.Detect): pass
class Model(_y.Model): pass
class DetectionModel(_y.Model): pass
"""
NAMES = ["cat", "dog", "bird", "fish"]


class _Call:
    """Pickles as a call of ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture
def fake_ultralytics(tmp_path):
    """Yield a function that turns a compress Model into an ultralytics-pickling one (fake classes)."""
    root = tmp_path / "fake_ultralytics"
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "common.py").write_text(FAKE_COMMON)
    (root / "models" / "yolo.py").write_text(FAKE_YOLO)
    assert "models" not in sys.modules
    sys.path.insert(0, str(root))
    import models.common as common
    import models.yolo as yolo

    def convert(model, root_cls="Model"):
        m = copy.deepcopy(model)
        for mod in m.modules():
            if type(mod).__module__ == blocks.__name__:
                mod.__class__ = getattr(yolo if type(mod) is blocks.Detect else common, type(mod).__name__)
        m.__class__ = getattr(yolo, root_cls)
        return m

    try:
        yield convert
    finally:
        _forget_fake_package(root)


def _forget_fake_package(root):
    """Take the fake ultralytics package off sys.path and out of sys.modules (idempotent)."""
    while str(root) in sys.path:
        sys.path.remove(str(root))
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]


def _reference(seed=0, v5_0=False):
    """A tiny trained-looking compress model (random weights and BN stats) and its ultralytics YAML.

    ``v5_0`` gives the YOLOv5 v5.0 backbone ends: a Focus stem and SPP instead of SPPF.
    """
    torch.manual_seed(seed)
    cfg = tiny_cfg()
    cfg.pop("yaml_file")
    if v5_0:
        cfg["backbone"][0] = [-1, 1, "Focus", [64, 3]]
        cfg["backbone"][9] = [-1, 1, "SPP", [1024, [5, 9, 13]]]
    m = Model(cfg, names=NAMES)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2)
    return m.eval(), dict(cfg, ch=3)


def _ultra(convert, model, ucfg, root_cls="Model", names=NAMES):
    """The half-precision, ultralytics-classed copy that train.py would pickle."""
    u = convert(model, root_cls)
    u.yaml, u.names, u.nc, u.hyp = copy.deepcopy(ucfg), names, model.nc, {"lr0": 0.01}
    return u.half()


def _save(path, model, ema=None, **extra):
    ck = {"epoch": -1, "best_fitness": None, "model": model, "ema": ema, "updates": None,
          "optimizer": None, "opt": {"imgsz": 64, "epochs": 3}, "date": "2024-01-01T00:00:00",
          "git": {"commit": "abc"}}
    ck.update(extra)
    torch.save(ck, path)
    return path


def _expected(model):
    """The original model with weights rounded to fp16, as the checkpoint stores them."""
    return copy.deepcopy(model).half().float().eval()


def _assert_same_outputs(loaded, ref):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded.eval()(x)[0], ref(x)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("root_cls", ["Model", "DetectionModel"])
def test_load_matches_original_model(fake_ultralytics, tmp_path, root_cls):
    ref, ucfg = _reference()
    f = _save(tmp_path / "best.pt", _ultra(fake_ultralytics, ref, ucfg, root_cls))
    _forget_fake_package(tmp_path / "fake_ultralytics")  # loading must not need (or import) the classes
    with pytest.raises(ModuleNotFoundError):  # what an unrestricted torch.load would now run into
        torch.load(f, weights_only=False)

    ck = load_checkpoint(f)
    assert "models" not in sys.modules
    assert set(ck) == {"cfg", "state_dict", "names", "meta"}
    assert ck["cfg"]["width_multiple"] == 0.125 and ck["cfg"]["nc"] == 4
    assert ck["names"] == NAMES
    assert ck["meta"]["epoch"] == -1 and ck["meta"]["date"] == "2024-01-01T00:00:00"
    assert ck["meta"]["stride"] == [8.0, 16.0, 32.0] and ck["meta"]["model_class"] == f"models.yolo.{root_cls}"
    assert ck["meta"]["opt"] == {"imgsz": 64, "epochs": 3}
    sd = ck["state_dict"]
    assert set(sd) == set(ref.state_dict())
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    assert "model.24.anchors" in sd and "model.0.conv.weight" in sd

    m = load_model(weights=f)
    m.load_state_dict(sd, strict=True)
    assert m.names == NAMES and m.nc == 4
    _assert_same_outputs(m, _expected(ref))
    _assert_same_outputs(load_model(f), _expected(ref))


def test_ema_preferred_over_model(fake_ultralytics, tmp_path):
    ref, ucfg = _reference(0)
    other, _ = _reference(1)
    f = _save(tmp_path / "last.pt", _ultra(fake_ultralytics, other, ucfg),
              ema=_ultra(fake_ultralytics, ref, ucfg), updates=7)
    ck = load_checkpoint(f)
    assert ck["meta"]["source"] == "ema" and ck["meta"]["updates"] == 7
    _assert_same_outputs(load_model(weights=f), _expected(ref))


def test_v5_era_details_nc_override_names_dict_numpy_meta(fake_ultralytics, tmp_path):
    import numpy as np

    ref, ucfg = _reference(v5_0=True)
    u = _ultra(fake_ultralytics, ref, dict(ucfg, nc=80), names=dict(enumerate(NAMES)))
    det = u.model[-1]
    det.register_buffer("anchor_grid", torch.ones(3, 1, 3, 1, 1, 2).half())  # persistent in v5.0
    det.register_buffer("scratch", torch.zeros(2), persistent=False)
    f = _save(tmp_path / "v5.pt", u, best_fitness=np.float64(0.25),
              training_results=np.array([1.0, 2.0]))
    ck = load_checkpoint(f)
    assert "model.24.anchor_grid" not in ck["state_dict"] and "model.24.scratch" not in ck["state_dict"]
    assert ck["cfg"]["nc"] == 4  # the model's nc wins over the YAML's, as in ultralytics
    assert ck["names"] == NAMES
    assert ck["meta"]["best_fitness"] == 0.25 and ck["meta"]["training_results"] == [1.0, 2.0]
    assert "model.0.conv.conv.weight" in ck["state_dict"] and "model.9.cv2.bn.weight" in ck["state_dict"]
    _assert_same_outputs(load_model(weights=f), _expected(ref))



def test_v6_era_expanded_grids_and_namespace_opt(fake_ultralytics, tmp_path):
    # v6 keeps Detect.grid / anchor_grid as lists of expand()ed views (zero strides, larger than their
    # data) after a validation pass, and some forks store opt as an argparse.Namespace with Paths in it
    import argparse
    from pathlib import PurePosixPath

    ref, ucfg = _reference()
    u = _ultra(fake_ultralytics, ref, ucfg)
    det = u.model[-1]
    det.grid, det.anchor_grid = zip(*(det._make_grid(80 // 2**i, 80 // 2**i, i, torch.float16, "cpu")
                                      for i in range(det.nl)))
    det.grid, det.anchor_grid = list(det.grid), list(det.anchor_grid)
    assert 0 in det.anchor_grid[0].stride()
    opt = argparse.Namespace(imgsz=64, epochs=3, save_dir=PurePosixPath("runs/train/exp"))
    ck = load_checkpoint(_save(tmp_path / "v6.pt", u, opt=opt))
    assert ck["meta"]["opt"] == {"imgsz": 64, "epochs": 3, "save_dir": "runs/train/exp"}
    _assert_same_outputs(load_model(weights=tmp_path / "v6.pt"), _expected(ref))


def test_numpy_values_of_plain_dtypes_in_both_numpy_spellings(fake_ultralytics, tmp_path):
    import zipfile

    import numpy as np

    ref, ucfg = _reference()
    values = {"f2": np.float16(1.5), "b1": np.bool_(True), "i1": np.int8(-3), "u2": np.array([1, 65535], np.uint16),
              "big_endian": np.array([1, -2], ">i4"), "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
              "bools": np.array([True, False]), "c8": np.complex64(1 + 2j), "empty": np.zeros((0, 3))}
    f = _save(tmp_path / "np2.pt", _ultra(fake_ultralytics, ref, ucfg), values=values)
    want = {"f2": 1.5, "b1": True, "i1": -3, "u2": [1, 65535], "big_endian": [1, -2],
            "fortran": [[0, 1, 2], [3, 4, 5]], "bools": [True, False], "empty": []}
    assert load_checkpoint(f)["meta"]["values"] == want  # complex is not plain metadata: left out

    # the same file as numpy 1 writes it (numpy.core instead of numpy._core)
    old = tmp_path / "np1.pt"
    with zipfile.ZipFile(f) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)
    assert load_checkpoint(old)["meta"]["values"] == want


def test_legacy_non_zip_format(fake_ultralytics, tmp_path):
    ref, ucfg = _reference()
    f = tmp_path / "legacy.pt"
    torch.save({"epoch": 3, "model": _ultra(fake_ultralytics, ref, ucfg), "ema": None}, f,
               _use_new_zipfile_serialization=False)
    assert not f.read_bytes().startswith(b"PK")
    ck = load_checkpoint(f)
    assert ck["meta"]["epoch"] == 3
    _assert_same_outputs(load_model(weights=f), _expected(ref))


def test_cli_info_on_checkpoint(fake_ultralytics, tmp_path, capsys):
    ref, ucfg = _reference()
    f = _save(tmp_path / "yolo.pt", _ultra(fake_ultralytics, ref, ucfg))
    assert main(["info", "--weights", str(f), "--imgsz", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(p.numel() for p in ref.parameters()):,} parameters" in out and "nc=4" in out


def _malicious_payloads(marker):
    return {
        "posix.system": _Call(os.system, f"touch {marker}"),
        "builtins.eval": _Call(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Call(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Call(subprocess.Popen, ["touch", str(marker)]),
        "torch.load": _Call(torch.load, str(marker)),
    }


@pytest.mark.parametrize("name", list(_malicious_payloads("x")))
def test_malicious_global_refused_and_never_called(tmp_path, name):
    marker = tmp_path / "MARKER"
    f = tmp_path / "evil.pt"
    payload = _malicious_payloads(marker)[name]
    torch.save({"epoch": -1, "model": payload, "ema": None}, f)
    with pytest.raises(UserError) as e:
        load_checkpoint(f)
    msg = str(e.value)
    pickled_as = f"{payload.fn.__module__}.{payload.fn.__name__}"  # posix.system, torch.serialization.load
    assert str(f) in msg and pickled_as in msg and "refused" in msg and "\n" not in msg
    assert not marker.exists()


def test_malicious_payload_nested_in_model_tree(fake_ultralytics, tmp_path):
    marker = tmp_path / "MARKER"
    ref, ucfg = _reference()
    u = _ultra(fake_ultralytics, ref, ucfg)
    u.model[3].payload = _Call(os.system, f"touch {marker}")
    f = _save(tmp_path / "evil.pt", u)
    with pytest.raises(UserError, match="system"):
        load_model(weights=f)
    assert not marker.exists()


def test_cli_exits_2_with_one_line_on_malicious_file(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    f = tmp_path / "evil.pt"
    torch.save({"model": _Call(os.system, f"touch {marker}")}, f)
    assert main(["info", "--weights", str(f), "--imgsz", "64"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refused" in err and str(f) in err
    assert not marker.exists()


def test_corrupt_and_foreign_files(fake_ultralytics, tmp_path):
    ref, ucfg = _reference()
    good = _save(tmp_path / "good.pt", _ultra(fake_ultralytics, ref, ucfg)).read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": _ultra(fake_ultralytics, ref, ucfg)}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        "half.pt": good[: len(good) // 2],
        "cut.pt": good[:-200],
        "legacy_cut.pt": legacy.read_bytes()[:-100],
        "text.pt": b"this is not a checkpoint\n",
        "empty.pt": b"",
        "random.pt": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(UserError) as e:
            load_checkpoint(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value), name


def test_plain_state_dict_asks_for_cfg(tmp_path):
    ref, _ = _reference()
    f = tmp_path / "sd.pt"
    torch.save(ref.state_dict(), f)
    with pytest.raises(UserError, match="--cfg"):
        load_model(weights=f)


def test_non_yolov5_models_refused(fake_ultralytics, tmp_path):
    f = _save(tmp_path / "seq.pt", nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(UserError, match="not a YOLOv5 detection model"):
        load_checkpoint(f)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not an ultralytics YOLOv5 checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"epoch": 1, "foo": 2}, tmp_path / "dict.pt")
    with pytest.raises(UserError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "dict.pt")

    ref, ucfg = _reference()
    u = _ultra(fake_ultralytics, ref, ucfg)
    u.model[1].act = nn.Hardswish()  # YOLOv5 v3-era activation: our Conv would compute something else
    with pytest.raises(UserError, match=r"model\.1.*Hardswish"):
        load_checkpoint(_save(tmp_path / "hswish.pt", u))
    u = _ultra(fake_ultralytics, ref, ucfg)
    del u.model[0].bn  # fused Conv
    with pytest.raises(UserError, match="fused"):
        load_checkpoint(_save(tmp_path / "fused.pt", u))


def _raw_checkpoint(path, pkl: bytes, records=None):
    """A torch.save-style zip whose data.pkl is hand-written pickle bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        for k, v in (records or {}).items():
            z.writestr(f"archive/data/{k}", v)
    return path


def test_pickle_build_on_allowed_objects_refused(tmp_path):
    # BUILD on a tensor would reach Tensor.__setstate__ -> set_(...) with file-chosen sizes.
    tensor = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(("
              b"S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI4\ntQ"
              b"I0\n(I4\nt(I1\ntI00\nccollections\nOrderedDict\n)Rt")
    cases = {
        "tensor_ok.pt": tensor + b"R.",
        "tensor_setstate.pt": tensor + b"R(I0\nI0\n(I100\nt(I1\nttb.",
        "function_attrs.pt": b"\x80\x02c_codecs\nencode\n(dS'x'\nI1\nsb.",
    }
    rec = {"0": torch.arange(4, dtype=torch.float32).numpy().tobytes()}
    ok = _raw_checkpoint(tmp_path / "tensor_ok.pt", cases.pop("tensor_ok.pt"), rec)
    with pytest.raises(UserError, match="holds a tensor"):  # parses; just not a checkpoint dict
        load_checkpoint(ok)
    for name, pkl in cases.items():
        with pytest.raises(UserError, match="unexpected state") as e:
            load_checkpoint(_raw_checkpoint(tmp_path / name, pkl, rec))
        assert str(tmp_path / name) in str(e.value)


@pytest.mark.parametrize("offset,size,stride,error", [
    (b"2", b"4", b"1", "past its storage"),
    (b"0", b"1000000000000", b"0", "far larger than its storage"),
])
def test_tensor_outside_its_storage_refused(tmp_path, offset, size, stride, error):
    pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(("
           b"S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI4\ntQ"
           b"I" + offset + b"\n(I" + size + b"\nt(I" + stride + b"\ntI00\nccollections\nOrderedDict\n)RtR.")
    f = _raw_checkpoint(tmp_path / "oob.pt", pkl, {"0": bytes(16)})
    with pytest.raises(UserError, match=error):
        load_checkpoint(f)
