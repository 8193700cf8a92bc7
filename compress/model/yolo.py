"""YOLOv5 model YAML: parsing, the explicit-channel normal form, and the model built from it.

A YAML is ultralytics' format (``nc``, ``depth_multiple``, ``width_multiple``, ``anchors``, ``backbone``,
``head``, rows ``[from, number, module, args]``). Parsing yields one :class:`LayerSpec` per row with
every constructor width resolved, and the *normal form*: the same YAML with ``explicit_channels: true``,
multiples 1.0 and every inner width written out (C3's cv1/cv2 and each bottleneck's hidden/out widths,
SPPF's cv1, a ShuffleBlock's branch width). A normal-form YAML is read literally: no multiple, no
rounding. This is the format pruning writes, so a pruned model is just a YAML with other numbers.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from ..errors import UserError
from .blocks import Detect
from .rules import BY_NAME, LayerSpec, RowContext, make_divisible  # noqa: F401  (re-exported)

CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_configs():
    """Names of the model YAMLs shipped with compress."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def resolve_cfg_path(cfg) -> Path:
    """Find a YAML by path, or by the name of a shipped config (``yolov5s`` or ``yolov5s.yaml``)."""
    text = str(cfg)
    p = Path(text)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    if (CONFIG_DIR / name).is_file() and len(p.parts) == 1:
        return CONFIG_DIR / name
    if p.is_dir():
        raise UserError(f"{cfg}: a folder, not a model YAML (give an artifact folder as --weights)")
    if len(p.parts) > 1 or text.endswith(("/", "\\")):
        raise UserError(f"{cfg}: no such file or directory")
    raise UserError(f"{cfg}: no such file, and no shipped config of that name (shipped: "
                    f"{', '.join(shipped_configs())})")


def load_cfg(cfg) -> dict:
    """Read a model YAML (a path, a shipped config name, or an already-loaded dict)."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    path = resolve_cfg_path(cfg)
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable text file ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a model YAML (expected a mapping with nc, anchors, backbone, head)")
    d.setdefault("yaml_file", str(path))
    return d


def parse_cfg(cfg, ch_in: int = 3):
    """Parse a model YAML into layer specs and its explicit-channel normal form.

    Returns ``(specs, normal_cfg)``. Raises UserError naming the file and layer for unknown modules,
    bad ``from`` indices, missing keys and malformed rows.
    """
    d = load_cfg(cfg)
    src = d.get("yaml_file", "<cfg>")
    for key in ("nc", "anchors", "backbone", "head"):
        if key not in d:
            raise UserError(f"{src}: missing key '{key}'")
    unknown = sorted(str(k) for k in d if k not in _TOP_KEYS)
    if unknown:
        raise UserError(f"{src}: unknown key '{unknown[0]}' (a model YAML has {', '.join(sorted(_TOP_KEYS - _QUIET))})")
    act = d.get("activation")
    if act is not None and str(act).replace(" ", "") not in ("nn.SiLU()", "SiLU"):
        raise UserError(f"{src}: activation {act!r}: compress's Conv is Conv2d + BatchNorm2d + SiLU; other "
                        f"activations are not supported")
    nc, anchors = d["nc"], d["anchors"]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise UserError(f"{src}: 'nc' must be a positive integer, got {nc!r}")
    explicit = bool(d.get("explicit_channels", False))
    gd = 1.0 if explicit else _multiple(d, "depth_multiple", src)
    gw = 1.0 if explicit else _multiple(d, "width_multiple", src)
    na = _check_anchors(anchors, src)
    no = na * (nc + 5)
    if not isinstance(d["backbone"], list) or not isinstance(d["head"], list) or not d["backbone"]:
        raise UserError(f"{src}: 'backbone' and 'head' must be lists of [from, number, module, args] rows")
    rows = d["backbone"] + d["head"]

    specs, ch, strides, out_rows = [], [], [], []
    for i, row in enumerate(rows):
        where = f"{src}: layer {i}"
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[3], list)):
            raise UserError(f"{where}: expected [from, number, module, args], got {row!r}")
        f, n, mname, args = row
        rule = BY_NAME.get(mname) if isinstance(mname, str) else None
        if rule is None:
            raise UserError(f"{where}: unknown module {mname!r} (known: {', '.join(sorted(BY_NAME))})")
        for j in (f if isinstance(f, list) else [f]):
            if isinstance(j, bool) or not isinstance(j, int) or not (-i <= j < i or j == -1):
                raise UserError(f"{where}: bad 'from' index {j!r} (layer {i} can only take earlier layers)")
        if i == 0 and f != -1:
            raise UserError(f"{where}: the first layer must take the input (from -1)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"{where}: 'number' must be a positive integer, got {n!r}")
        args = [_resolve_arg(a, nc, anchors) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        c_in = ch[f] if isinstance(f, int) and i > 0 else (ch_in if i == 0 else None)
        s_in = strides[f] if isinstance(f, int) and i > 0 else (1.0 if i == 0 else None)
        ctx = RowContext(i, f, n, mname, args, c_in, ch, gw, no, explicit, nc)
        try:
            spec, norm_args, n_out = rule.parse(ctx)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise UserError(f"{where}: bad args {args!r} for {mname} ({e})") from None
        spec.stride = _out_stride(spec, s_in, strides)
        if spec.type == "Concat" and len({strides[x] for x in f}) != 1:
            raise UserError(f"{where}: Concat of layers {f} at different scales (strides "
                            f"{[strides[x] for x in f]}): their feature maps do not line up")
        specs.append(spec)
        ch.append(spec.c_out)
        strides.append(spec.stride)
        out_rows.append([f, n_out, spec.type, norm_args])

    nb = len(d["backbone"])
    normal = {k: v for k, v in d.items() if k not in ("backbone", "head", "yaml_file", "ch", "names")}
    normal.update(explicit_channels=True, depth_multiple=1.0, width_multiple=1.0)
    normal["backbone"], normal["head"] = out_rows[:nb], out_rows[nb:]
    if not specs or specs[-1].type != "Detect":
        raise UserError(f"{src}: the last layer must be Detect")
    return specs, normal


_TOP_KEYS = {"nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head", "explicit_channels", "names",
             "ch", "yaml_file", "activation"}
_QUIET = {"ch", "yaml_file", "activation"}  # accepted, not advertised


def _multiple(d, key, src) -> float:
    v = d.get(key, 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 16) or v != v:
        raise UserError(f"{src}: {key} {v!r}: must be a number in (0, 16]")
    return float(v)


def _check_anchors(anchors, src) -> int:
    """Anchors per level (an int, or levels of (w, h) pairs of positive numbers, the same count each)."""
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        if not 1 <= anchors <= 16:
            raise UserError(f"{src}: anchors {anchors}: give 1..16 anchors per level, or the (w, h) pairs")
        return anchors
    ok = isinstance(anchors, list) and anchors and all(isinstance(a, list) and a and len(a) % 2 == 0
                                                       for a in anchors)
    if not ok:
        raise UserError(f"{src}: anchors: expected a list of levels, each a list of w, h pairs (e.g. [10, 13, 16, 30])")
    if len({len(a) for a in anchors}) != 1:
        raise UserError(f"{src}: anchors: every level needs the same number of anchors, got "
                        f"{[len(a) // 2 for a in anchors]}")
    for a in anchors:
        for v in a:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1e5):
                raise UserError(f"{src}: anchors: {v!r} is not a positive anchor size in pixels")
    return len(anchors[0]) // 2


def _resolve_arg(a, nc, anchors):
    if isinstance(a, str):
        return {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}.get(a, a)
    return a


def _out_stride(spec, s_in, strides):
    """Total downsampling at a layer's output (the Detect row's is its first input's)."""
    if isinstance(spec.f, list):
        return strides[spec.f[0]] if spec.type != "Detect" else 0.0
    return s_in * spec.rule.stride(spec.p)


def detect_head(model) -> Detect:
    """The Detect module of a model: a Model, a DDP-wrapped one, a QAT-prepared (traced) one, or Detect itself."""
    if isinstance(model, Detect):
        return model
    for m in model.modules():
        if isinstance(m, Detect):
            return m
    raise UserError(f"{type(model).__name__}: the model has no Detect head")


class Model(nn.Module):
    """A YOLOv5 detector built from a YAML.

    ``model`` is an ``nn.Sequential`` of the rows (so state_dict keys are ultralytics' ``model.N...``);
    ``yaml`` holds the normal form, ``names`` the class names.
    """

    def __init__(self, cfg="yolov5s.yaml", ch: int = 3, nc: int | None = None, names=None):
        super().__init__()
        d = load_cfg(cfg)
        if nc is not None and nc != d.get("nc"):
            d["nc"] = nc
        specs, self.yaml = parse_cfg(d, ch)
        self.model, self.save = _build_layers(specs)
        det = self.model[-1]
        det.stride = torch.tensor([specs[j].stride for j in specs[-1].f], dtype=torch.float32)
        if any(s <= 0 for s in det.stride.tolist()):
            raise UserError(f"{d.get('yaml_file', '<cfg>')}: could not infer the Detect strides")
        det.anchors /= det.stride.view(-1, 1, 1)
        _check_anchor_order(det)
        self.stride = det.stride
        det.initialize_biases()
        _initialize_weights(self)
        self.nc = self.yaml["nc"]
        self.names = list(names) if names is not None else list(d.get("names") or [str(i) for i in range(self.nc)])

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def _build_layers(specs):
    layers, save = [], []
    for s in specs:
        m = s.build()
        m.i, m.f, m.type = s.i, s.f, s.type
        m.np = sum(p.numel() for p in m.parameters())
        save.extend(x % s.i for x in ([s.f] if isinstance(s.f, int) else s.f) if x != -1)
        layers.append(m)
    return nn.Sequential(*layers), sorted(set(save))


def _check_anchor_order(det):
    a = det.anchors.prod(-1).mean(-1).view(-1)
    da, ds = a[-1] - a[0], det.stride[-1] - det.stride[0]
    if da and (da.sign() != ds.sign()):
        det.anchors[:] = det.anchors.flip(0)


def _initialize_weights(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
            m.momentum = 0.03
        elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
            m.inplace = True
