"""Checkpoints of the reference tool (YOLOv5-Multibackbone-Compression) for its five lightweight backbones.

The reference saves a trained model as a whole pickled ``models.yolo.Model`` of *its* classes, fp16, after
``strip_optimizer``. Those files are made here: fake ``models.common`` / ``models.yolo`` modules are put
in ``sys.modules`` for the save only; their lightweight blocks (and ``Conv``) are written the way the
reference's ``models/common.py`` writes them (same constructors, attribute names, sub-module layout and
forward), so the pickles carry the reference's class names, attributes and state-dict keys
(``Conv_maxpool.conv.0``, ``MBConvBlock.drop_connect`` ...). The standard YOLOv5 classes (C3, SPPF,
Concat, Detect, Model) are compress's own under the reference's names (same layout).

Each model is built from the reference YAML at width 0.125 and nc=3 (same rows, a few hundred thousand
parameters): compress's model gives the random weights, the reference blocks are built by their own
constructors from the row's args and take those tensors in registration order (shape-checked). The
loaded model must then match the reference model's own forward, hold exactly the stored tensors and
keep the embedded YAML; and nothing of the pickle may run (a ``__setstate__`` tripwire).
"""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from compress import load_model
from compress.cli import main
from compress.errors import UserError
from compress.model import blocks as B
from compress.model import light as L
from compress.model import yolo as Y
from compress.model.ultralytics_ckpt import load_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
YAMLS = FIXTURES / "reference-yamls"
BACKBONES = {  # YAML stem -> the reference blocks it uses (and compress's module for each)
    "yolov5lGhost": {"GhostBottleneck": L.GhostBottleneck},
    "yolov5lShffule": {"Conv_maxpool": B.Conv_maxpool,
                       "ShuffleNetV2_InvertedResidual": L.ShuffleNetV2_InvertedResidual},
    "yolov5lMobilenetv3Small": {"conv_bn_hswish": L.conv_bn_hswish,
                                "MobileNetV3_InvertedResidual": L.MobileNetV3_InvertedResidual},
    "yolov5lEfficientLite": {"stem": L.stem, "MBConvBlock": L.MBConvBlock},
    "yolov5lPP-LC": {"DepthSepConv": L.DepthSepConv},
}
NC, WIDTH, NAMES = 3, 0.125, ["ki67+", "ki67-", "other"]
TRIPWIRE: list[Path] = []  # where a reference object's __setstate__ would write, if anything ran it

pytestmark = pytest.mark.skipif(not YAMLS.is_dir(), reason=f"reference YAMLs folder {YAMLS} is absent")


# ------------------------------------------------------------- the reference's classes (models/common.py)
def autopad(k, p=None):
    return k // 2 if p is None else p


class _Tripwire:
    """Writes the marker when unpickled by a real unpickler (pickle's BUILD calls __setstate__)."""

    def __setstate__(self, state):
        for marker in TRIPWIRE:
            marker.write_text("pickled code ran")
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:
            self.__dict__.update(state)


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SeBlock(nn.Module):
    def __init__(self, in_channel, reduction=4):
        super().__init__()
        self.Squeeze = nn.AdaptiveAvgPool2d(1)
        self.Excitation = nn.Sequential()
        self.Excitation.add_module("FC1", nn.Conv2d(in_channel, in_channel // reduction, kernel_size=1))
        self.Excitation.add_module("ReLU", nn.ReLU())
        self.Excitation.add_module("FC2", nn.Conv2d(in_channel // reduction, in_channel, kernel_size=1))
        self.Excitation.add_module("Sigmoid", nn.Sigmoid())

    def forward(self, x):
        return x * (self.Excitation(self.Squeeze(x)).expand_as(x))


class GhostConv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, g=1, act=True):
        super().__init__()
        c_ = c2 // 2
        self.primary_conv = Conv(c1, c_, k=1, s=1, act=act)
        self.cheap_operation = Conv(c_, c_, k=3, s=1, p=1, g=c_, act=act)

    def forward(self, x):
        y = self.primary_conv(x)
        return torch.cat([y, self.cheap_operation(y)], 1)


class GhostBottleneck(_Tripwire, nn.Module):
    def __init__(self, c1, c2, midc, k=5, s=1, use_se=False):
        super().__init__()
        c_ = midc
        self.conv = nn.Sequential(GhostConv(c1, c_, 1, 1),
                                  Conv(c_, c_, 3, s=2, p=1, g=c_, act=False) if s == 2 else nn.Identity(),
                                  SeBlock(c_) if use_se else nn.Sequential(),
                                  GhostConv(c_, c2, 1, 1, act=False))
        self.shortcut = nn.Identity() if (c1 == c2 and s == 1) else \
            nn.Sequential(Conv(c1, c1, 3, s=s, p=1, g=c1, act=False), Conv(c1, c2, 1, 1, act=False))

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)


class Conv_maxpool(nn.Module):  # noqa: N801
    def __init__(self, c1, c2):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(c2), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)

    def forward(self, x):
        return self.maxpool(self.conv(x))


class ShuffleNetV2_InvertedResidual(nn.Module):  # noqa: N801
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        bf = oup // 2
        if self.stride == 2:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, kernel_size=3, stride=self.stride, padding=1, groups=inp), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, bf, kernel_size=1, stride=1, padding=0, bias=False), nn.BatchNorm2d(bf),
                nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if (self.stride == 2) else bf, bf, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
            nn.Conv2d(bf, bf, kernel_size=3, stride=self.stride, padding=1, groups=bf), nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, kernel_size=1, stride=1, padding=0, bias=False), nn.BatchNorm2d(bf),
            nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.channel_shuffle(out, 2)

    def channel_shuffle(self, x, groups):
        N, C, H, W = x.size()
        return x.view(N, groups, C // groups, H, W).permute(0, 2, 1, 3, 4).contiguous().view(N, C, H, W)


class conv_bn_hswish(nn.Module):  # noqa: N801
    def __init__(self, c1, c2, stride):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MobileNetV3_InvertedResidual(nn.Module):  # noqa: N801
    def __init__(self, inp, oup, hidden_dim, kernel_size, stride, use_se, use_hs):
        super().__init__()
        self.identity = stride == 1 and inp == oup
        pad = (kernel_size - 1) // 2
        if inp == hidden_dim:
            self.conv = nn.Sequential(
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, pad, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim), nn.Hardswish() if use_hs else nn.ReLU(),
                SeBlock(hidden_dim) if use_se else nn.Sequential(),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim),
                nn.Hardswish() if use_hs else nn.ReLU(),
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, pad, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim), SeBlock(hidden_dim) if use_se else nn.Sequential(),
                nn.Hardswish() if use_hs else nn.ReLU(),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.identity else y


class drop_connect(_Tripwire):  # noqa: N801  (a plain object, not a module, in the reference)
    def __init__(self, drop_connect_rate):
        self.drop_connect_rate = drop_connect_rate


class stem(nn.Module):  # noqa: N801
    def __init__(self, c1, c2, act="ReLU6"):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(num_features=c2)
        if act == "ReLU6":
            self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MBConvBlock(nn.Module):
    def __init__(self, inp, final_oup, k, s, expand_ratio, drop_connect_rate, has_se=False):
        super().__init__()
        self._momentum, self._epsilon = 0.01, 1e-3
        self.input_filters, self.output_filters, self.stride = inp, final_oup, s
        self.expand_ratio, self.has_se, self.id_skip = expand_ratio, has_se, True
        oup = inp * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_channels=inp, out_channels=oup, kernel_size=1, bias=False)
            self._bn0 = nn.BatchNorm2d(num_features=oup, momentum=self._momentum, eps=self._epsilon)
        self._depthwise_conv = nn.Conv2d(in_channels=oup, out_channels=oup, groups=oup, kernel_size=k,
                                         padding=(k - 1) // 2, stride=s, bias=False)
        self._bn1 = nn.BatchNorm2d(num_features=oup, momentum=self._momentum, eps=self._epsilon)
        if self.has_se:
            self.se = SeBlock(oup, 4)
        self._project_conv = nn.Conv2d(in_channels=oup, out_channels=final_oup, kernel_size=1, bias=False)
        self._bn2 = nn.BatchNorm2d(num_features=final_oup, momentum=self._momentum, eps=self._epsilon)
        self._relu = nn.ReLU6(inplace=True)
        self.drop_connect = drop_connect(drop_connect_rate)

    def forward(self, x, drop_connect_rate=None):
        identity = x
        if self.expand_ratio != 1:
            x = self._relu(self._bn0(self._expand_conv(x)))
        x = self._relu(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            x = self.se(x)
        x = self._bn2(self._project_conv(x))
        if self.id_skip and self.stride == 1 and self.input_filters == self.output_filters:
            x += identity
        return x


class DepthSepConv(nn.Module):
    def __init__(self, inp, oup, dw_size, stride, use_se):
        super().__init__()
        self.stride, self.inp, self.oup, self.dw_size = stride, inp, oup, dw_size
        self.dw_sp = nn.Sequential(
            nn.Conv2d(self.inp, self.inp, kernel_size=self.dw_size, stride=self.stride, padding=(dw_size - 1) // 2,
                      groups=self.inp, bias=False),
            nn.BatchNorm2d(self.inp), nn.Hardswish(),
            SeBlock(self.inp, reduction=16) if use_se else nn.Sequential(),
            nn.Conv2d(self.inp, self.oup, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(self.oup), nn.Hardswish())

    def forward(self, x):
        return self.dw_sp(x)


# the standard YOLOv5 classes: compress's own modules (same layout) under the reference's names
class C3(B.C3):
    pass


class Bottleneck(B.Bottleneck):
    pass


class SPPF(B.SPPF):
    pass


class Concat(B.Concat):
    pass


class Detect(B.Detect):
    onnx_dynamic = False


class Model(_Tripwire, Y.Model):
    def _apply(self, fn):  # the reference's: Detect's stride and grids follow .half() (plain attributes)
        self = super()._apply(fn)
        m = self.model[-1]
        m.stride, m.grid, m.anchor_grid = fn(m.stride), list(map(fn, m.grid)), list(map(fn, m.anchor_grid))
        return self


COMMON = (Conv, SeBlock, GhostConv, GhostBottleneck, Conv_maxpool, ShuffleNetV2_InvertedResidual, conv_bn_hswish,
          MobileNetV3_InvertedResidual, drop_connect, stem, MBConvBlock, DepthSepConv, C3, Bottleneck, SPPF, Concat)
REFERENCE = {"models.common": COMMON, "models.yolo": (Detect, Model)}
RENAMED = {B.Conv: Conv, B.C3: C3, B.Bottleneck: Bottleneck, B.SPPF: SPPF, B.Concat: Concat, B.Detect: Detect}
for _module, _classes in REFERENCE.items():
    for _cls in _classes:
        _cls.__module__ = _module  # pickled as models.common.X / models.yolo.X


@pytest.fixture
def reference_modules():
    """The fake ``models`` package in sys.modules (for pickling); gone again when the test loads."""
    assert not any(n == "models" or n.startswith("models.") for n in sys.modules)
    pkg = types.ModuleType("models")
    sys.modules["models"] = pkg
    for name, classes in REFERENCE.items():
        mod = types.ModuleType(name)
        for cls in classes:
            setattr(mod, cls.__name__, cls)
        sys.modules[name] = mod
        setattr(pkg, name.split(".")[1], mod)
    yield
    _forget_reference()


def _forget_reference():
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]


# ------------------------------------------------------------------------------- building the files
def _reference_yaml(stem: str) -> dict:
    path = YAMLS / f"{stem}.yaml"
    if not path.is_file():
        pytest.skip(f"reference YAML {path} is absent")
    d = yaml.safe_load(path.read_text())
    d.update(nc=NC, width_multiple=WIDTH, ch=3)  # ch: the reference's Model writes it into its yaml
    return d


def _randomize(model: nn.Module, seed: int) -> None:
    """Trained-looking BN statistics and affine parameters (a fresh model's are 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3), (m.running_mean, -0.3, 0.3),
                                  (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


def _initialize_weights(model: nn.Module) -> None:
    """The reference's utils.torch_utils.initialize_weights (what its Model applies to every module)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03
        elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
            m.inplace = True


def _reference_layer(row, spec, ours: nn.Module) -> nn.Module:
    """The reference's module for a YAML row (its parse_model: ``m(c1, c2, *args[1:])``, n copies in a
    Sequential), holding ``ours``' tensors in registration order."""
    cls = {c.__name__: c for c in COMMON}[row[2]]
    args = [spec.p["c1"], spec.p["c2"], *row[3][1:]]
    ref = nn.Sequential(*(cls(*args) for _ in range(spec.n))) if spec.n > 1 else cls(*args)
    _initialize_weights(ref)
    mine, theirs = list(ours.state_dict().items()), list(ref.state_dict().items())
    assert [tuple(v.shape) for _, v in mine] == [tuple(v.shape) for _, v in theirs], row
    with torch.no_grad():
        for (_, src), (_, dst) in zip(mine, theirs):
            dst.copy_(src)
    return ref


def _reference_model(stem: str, seed: int = 0):
    """``(reference model (fp32), compress's model with the same weights, the embedded YAML)``."""
    torch.manual_seed(seed)
    cfg = _reference_yaml(stem)
    ours = Y.Model(copy.deepcopy(cfg), names=NAMES)
    _randomize(ours, seed)
    specs, _ = Y.parse_cfg(copy.deepcopy(cfg))
    ref = copy.deepcopy(ours)
    rows = cfg["backbone"] + cfg["head"]
    for i, (row, spec) in enumerate(zip(rows, specs)):
        if row[2] in BACKBONES[stem]:
            layer = _reference_layer(row, spec, ours.model[i])
            layer.i, layer.f, layer.np = spec.i, spec.f, sum(p.numel() for p in layer.parameters())
            ref.model[i] = layer
        ref.model[i].type = {"nn.Upsample": "torch.nn.modules.upsampling.Upsample",
                             "Detect": "models.yolo.Detect"}.get(row[2], f"models.common.{row[2]}")
    for m in ref.modules():
        if type(m) in RENAMED:
            m.__class__ = RENAMED[type(m)]
    ref.__class__ = Model
    det = ref.model[-1]
    det.grid = [torch.zeros(1)] * det.nl  # v6.0 Detect keeps these lists (not buffers)
    det.anchor_grid = [torch.zeros(1)] * det.nl
    det.inplace = True
    ref.yaml, ref.nc, ref.names, ref.inplace = copy.deepcopy(cfg), NC, list(NAMES), True
    ref.hyp, ref.gr = {"lr0": 0.01, "box": 0.05}, 1.0
    ref.class_weights = torch.tensor([0.5, 1.5, 1.0]) * NC  # train.py attaches these
    return ref.eval(), ours.eval(), cfg


def _save_stripped(path: Path, ref: nn.Module) -> Path:
    """What the reference's train.py + strip_optimizer leave: the model in fp16, no optimizer, no EMA."""
    model = copy.deepcopy(ref).half()
    for p in model.parameters():
        p.requires_grad = False
    ck = {"epoch": -1, "best_fitness": np.array([0.4125]), "model": model, "ema": None, "updates": None,
          "optimizer": None, "training_results": None, "wandb_id": None}
    torch.save(ck, path)
    return path


def _image():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("stem", list(BACKBONES))
def test_reference_checkpoint_loads_exactly(reference_modules, tmp_path, stem):
    ref, ours, cfg = _reference_model(stem)
    f = _save_stripped(tmp_path / f"{stem}.pt", ref)
    marker = tmp_path / "MARKER"
    TRIPWIRE[:] = [marker]
    try:
        torch.load(f, weights_only=False)  # an unrestricted load runs the tripwire: it is live
        assert marker.exists()
        marker.unlink()
        _forget_reference()

        ck = load_checkpoint(f)
        model = load_model(weights=f)
    finally:
        TRIPWIRE.clear()
    assert not marker.exists(), "loading ran code from the pickle"
    assert not any(n == "models" or n.startswith("models.") for n in sys.modules)

    # the tensors: exactly the stored (fp16) ones, under compress's names
    want = {k: v.half().float() if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    assert set(ck["state_dict"]) == set(want)
    for k, v in want.items():
        assert torch.equal(ck["state_dict"][k], v), k
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    for i, row in enumerate(cfg["backbone"]):
        if row[2] in BACKBONES[stem]:
            assert type(model.model[i]) is (BACKBONES[stem][row[2]] if row[1] == 1 else nn.Sequential)

    # the YAML: the embedded one, and compress's model of it
    assert {k: v for k, v in ck["cfg"].items() if k != "yaml_file"} == cfg
    assert model.yaml == ours.yaml and model.nc == NC and model.names == NAMES
    assert ck["meta"]["epoch"] == -1 and ck["meta"]["best_fitness"] == [0.4125]
    assert ck["meta"]["stride"] == [8.0, 16.0, 32.0] and ck["meta"]["source"] == "model"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())

    # the outputs: the reference's own forward on the stored weights
    x = _image()
    with torch.no_grad():
        expected = copy.deepcopy(ref).half().float().eval()(x)
        out = model.eval()(x)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(out[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cli_info_on_reference_checkpoint(reference_modules, tmp_path, capsys):
    ref, ours, _ = _reference_model("yolov5lMobilenetv3Small")
    f = _save_stripped(tmp_path / "best.pt", ref)
    _forget_reference()
    assert main(["info", "--weights", str(f), "--imgsz", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(p.numel() for p in ours.parameters()):,} parameters" in out and f"nc={NC}" in out


@pytest.mark.parametrize("part", ["conv", "shortcut"])
def test_cli_malformed_reference_block_exits_2_naming_the_layer(reference_modules, tmp_path, capsys, part):
    ref, _, _ = _reference_model("yolov5lGhost")
    delattr(ref.model[3], part)  # a GhostBottleneck without its main path / its (identity) shortcut
    f = _save_stripped(tmp_path / "broken.pt", ref)
    _forget_reference()
    assert main(["info", "--weights", str(f), "--imgsz", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(f) in err and "model.3" in err, err
    with pytest.raises(UserError, match=f"model\\.3.*'{part}'"):
        load_checkpoint(f)
