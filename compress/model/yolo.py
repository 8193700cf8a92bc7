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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from ..errors import UserError
from .blocks import (
    C3, MODULES, SPP, SPPF, Bottleneck, Concat, Conv, Conv_maxpool, Detect, Focus, ShuffleBlock,
)

CONFIG_DIR = Path(__file__).parent / "configs"

# Blocks whose first arg is an output width that ultralytics scales by width_multiple.
_SCALED = (Conv, Bottleneck, C3, SPPF, SPP, Focus, Conv_maxpool)
# Blocks whose number column repeats bottlenecks inside the block (scaled by depth_multiple).
_REPEATS_INSIDE = (C3,)


def make_divisible(x, divisor=8):
    """Smallest multiple of ``divisor`` that is >= x (ultralytics' width rounding)."""
    return math.ceil(x / divisor) * divisor


@dataclass
class LayerSpec:
    """One parsed YAML row: what to build and with which widths."""

    i: int                 # layer index
    f: int | list          # from: -1, an index, or a list of them
    n: int                 # repeats (already scaled)
    type: str              # module name as written in the normal form
    cls: type              # the block class
    args: list             # positional constructor args (c1, c2, ... resolved)
    kwargs: dict = field(default_factory=dict)  # explicit inner widths
    c_out: int = 0         # output channels of the layer
    stride: float = 1.0    # total downsampling at this layer's output


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
    nc, anchors = d["nc"], d["anchors"]
    if not isinstance(nc, int) or nc < 1:
        raise UserError(f"{src}: 'nc' must be a positive integer, got {nc!r}")
    explicit = bool(d.get("explicit_channels", False))
    gd = 1.0 if explicit else float(d.get("depth_multiple", 1.0))
    gw = 1.0 if explicit else float(d.get("width_multiple", 1.0))
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    rows = d["backbone"] + d["head"]
    if not isinstance(d["backbone"], list) or not isinstance(d["head"], list):
        raise UserError(f"{src}: 'backbone' and 'head' must be lists of [from, number, module, args] rows")

    specs, ch, strides, out_rows = [], [], [], []
    for i, row in enumerate(rows):
        where = f"{src}: layer {i}"
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[3], list)):
            raise UserError(f"{where}: expected [from, number, module, args], got {row!r}")
        f, n, mname, args = row
        cls = MODULES.get(mname)
        if cls is None:
            raise UserError(f"{where}: unknown module '{mname}' (known: {', '.join(sorted(MODULES))})")
        for j in (f if isinstance(f, list) else [f]):
            if not isinstance(j, int) or not (-i <= j < i or j == -1):
                raise UserError(f"{where}: bad 'from' index {j!r} (layer {i} can only take earlier layers)")
        if i == 0 and f != -1:
            raise UserError(f"{where}: the first layer must take the input (from -1)")
        if not isinstance(n, int) or n < 1:
            raise UserError(f"{where}: 'number' must be a positive integer, got {n!r}")
        args = [_resolve_arg(a, nc, anchors) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        c_in = ch[f] if isinstance(f, int) and i > 0 else (ch_in if i == 0 else None)
        s_in = strides[f] if isinstance(f, int) and i > 0 else (1.0 if i == 0 else None)
        try:
            spec, norm_args, n_out = _parse_row(i, f, n, mname, cls, args, c_in, ch, gw, no, explicit, nc)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise UserError(f"{where}: bad args {args!r} for {mname} ({e})") from None
        spec.stride = _out_stride(spec, s_in, strides)
        specs.append(spec)
        ch.append(spec.c_out)
        strides.append(spec.stride)
        out_rows.append([f, n_out, spec.type, norm_args])

    nb = len(d["backbone"])
    normal = {k: v for k, v in d.items() if k not in ("backbone", "head", "yaml_file", "ch", "names")}
    normal.update(explicit_channels=True, depth_multiple=1.0, width_multiple=1.0)
    normal["backbone"], normal["head"] = out_rows[:nb], out_rows[nb:]
    if not specs or specs[-1].cls is not Detect:
        raise UserError(f"{src}: the last layer must be Detect")
    return specs, normal


def _resolve_arg(a, nc, anchors):
    if isinstance(a, str):
        return {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}.get(a, a)
    return a


def _explicit(args, keys, where_keys):
    """Split a trailing dict of explicit widths off ``args``."""
    if args and isinstance(args[-1], dict):
        extra = args[-1]
        unknown = set(extra) - set(keys)
        if unknown:
            raise UserError(f"unknown width key(s) {sorted(unknown)} (allowed: {where_keys})")
        return args[:-1], extra
    return args, {}


def _parse_row(i, f, n, mname, cls, args, c1, ch, gw, no, explicit, nc):
    """Resolve one row: constructor args, output width, and the normal-form args."""
    kwargs = {}
    if cls in _SCALED or cls is ShuffleBlock:
        if c1 is None:
            raise UserError(f"{mname} takes one input, got from={f!r}")
        keys = {C3: ("cv1", "cv2", "m"), Bottleneck: ("cv1",), SPPF: ("cv1",), SPP: ("cv1",),
                ShuffleBlock: ("hidden",)}.get(cls, ())
        args, extra = _explicit(list(args), keys, ", ".join(keys) or "none")
        if not args or not isinstance(args[0], int) or args[0] < 1:
            raise UserError(f"first arg must be a positive output width, got {args[:1]!r}")
        c2 = args[0]
        if cls is not ShuffleBlock and c2 != no and not explicit:
            c2 = make_divisible(c2 * gw, 8)
        rest = args[1:]
        norm_args = [c2, *rest]
        if cls is C3:
            shortcut = rest[0] if rest else True
            e = rest[2] if len(rest) > 2 else 0.5
            c_ = int(c2 * e)
            cv1 = int(extra.get("cv1", c_))
            cv2 = int(extra.get("cv2", c_))
            m = [list(map(int, x)) for x in extra.get("m", [[cv1, cv1]] * n)]
            if len(m) != n:
                raise UserError(f"C3 repeats {n} bottlenecks but lists {len(m)} widths in 'm'")
            cin = cv1
            for hidden, out in m:
                if shortcut and out != cin:
                    raise UserError(f"C3 with shortcut needs every bottleneck output == cv1 ({cin}), got {out}")
                cin = out
            kwargs = dict(c_cv1=cv1, c_cv2=cv2, m_ch=m)
            ctor = [c1, c2, n, *rest[:2]]
            norm_args = [c2, bool(shortcut), *rest[1:2], {"cv1": cv1, "cv2": cv2, "m": m}]
            n_out = n
        elif cls is Bottleneck:
            shortcut = rest[0] if rest else True
            c_ = int(extra.get("cv1", int(c2 * (rest[2] if len(rest) > 2 else 0.5))))
            kwargs = dict(c_=c_)
            ctor = [c1, c2, *rest[:2]]
            norm_args = [c2, bool(shortcut), *rest[1:2], {"cv1": c_}]
            n_out = n
        elif cls in (SPPF, SPP):
            c_ = int(extra.get("cv1", c1 // 2))
            kwargs = dict(c_=c_)
            ctor = [c1, c2, *rest[:1]]
            k = rest[0] if rest else (5 if cls is SPPF else [5, 9, 13])
            norm_args = [c2, k, {"cv1": c_}]
            n_out = n
        elif cls is ShuffleBlock:
            stride = rest[0] if rest else 1
            hidden = extra.get("hidden", c2 // 2)
            hidden = [int(h) for h in hidden] if isinstance(hidden, list) else [int(hidden)] * n
            if len(hidden) != n:
                raise UserError(f"ShuffleBlock repeats {n} times but lists {len(hidden)} 'hidden' widths")
            kwargs = dict(hidden=hidden)  # one width per repeat
            ctor = [c1, c2, stride]
            norm_args = [c2, stride, {"hidden": hidden}]
            n_out = n
        else:  # Conv, Focus, Conv_maxpool
            ctor = [c1, c2, *rest]
            n_out = n
        if n > 1 and cls not in _REPEATS_INSIDE:
            # Repeated plain blocks chain: each copy takes the previous one's output.
            if cls is ShuffleBlock and ctor[2] != 1:
                raise UserError("a repeated ShuffleBlock must have stride 1")
            if c1 != c2 and cls is not ShuffleBlock:
                raise UserError(f"repeating {mname} {n} times needs input width == output width")
        return LayerSpec(i, f, n, mname_normal(cls, mname), cls, ctor, kwargs, c2), norm_args, n_out
    if cls is Concat:
        c2 = sum(ch[x] for x in f)
        return LayerSpec(i, f, n, "Concat", cls, list(args), {}, c2), list(args), n
    if cls is Detect:
        if not isinstance(f, list):
            raise UserError("Detect takes a list of input layers")
        if len(args) < 2:
            raise UserError(f"Detect args are [nc, anchors], got {args!r}")
        if isinstance(args[0], bool) or not isinstance(args[0], int) or args[0] != nc:
            raise UserError(f"Detect's first arg (its number of classes) is {args[0]!r}: write nc (the YAML's nc is "
                            f"{nc})")
        anchors = args[1]
        if isinstance(anchors, int):
            anchors = [list(range(anchors * 2))] * len(f)
        if not isinstance(anchors, list) or len(anchors) != len(f):
            raise UserError(f"Detect has {len(f)} inputs but {len(anchors) if isinstance(anchors, list) else anchors} anchor levels")
        ctor = [args[0], anchors, [ch[x] for x in f]]
        return LayerSpec(i, f, n, "Detect", cls, ctor, {}, no), ["nc", "anchors"], n
    # nn.Upsample and other pass-through modules
    c2 = ch[f]
    return LayerSpec(i, f, n, "nn.Upsample", cls, list(args), {}, c2), list(args), n


def mname_normal(cls, name):
    """The canonical module name written in the normal form (aliases mapped to one spelling)."""
    return {Conv_maxpool: "Conv_maxpool", ShuffleBlock: "ShuffleBlock"}.get(cls, name)


def _out_stride(spec, s_in, strides):
    if spec.cls is Concat:
        return strides[spec.f[0]]
    if spec.cls is Detect:
        return s_in if s_in is not None else 0.0
    cls, a = spec.cls, spec.args
    if cls is Conv:
        return s_in * (a[3] if len(a) > 3 else 1)
    if cls is Focus:
        return s_in * 2 * (a[3] if len(a) > 3 else 1)
    if cls is Conv_maxpool:
        return s_in * 4
    if cls is ShuffleBlock:
        return s_in * a[2]
    if cls is nn.Upsample:
        sf = a[1] if len(a) > 1 else 2
        return s_in / sf
    return s_in


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
        if s.cls is ShuffleBlock:
            blocks = [s.cls(*s.args, hidden=h) for h in s.kwargs["hidden"]]
            m = blocks[0] if s.n == 1 else nn.Sequential(*blocks)
        elif s.n > 1 and s.cls not in _REPEATS_INSIDE:
            m = nn.Sequential(*(s.cls(*s.args, **s.kwargs) for _ in range(s.n)))
        else:
            m = s.cls(*s.args, **s.kwargs)
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
