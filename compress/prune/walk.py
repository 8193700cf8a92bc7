"""The walk over a normal-form YAML's layers: every conv's channel sets and spatial size, once.

One pass over the layer specs (:func:`walk`) creates a channel set per conv output, merges the sets a
residual add joins (union-find), records every conv (:class:`ConvRecord`: its input layout, output set,
kernel, keys and output size at the walked image size) and every per-channel op that thop counts
(:class:`ChannelOpRecord`: upsampling, global pooling). What
each block holds is its rule's (:mod:`compress.model.rules`, ``walk``): the walker only offers the
primitives. :mod:`compress.prune.groups` turns a walk into channel groups and :mod:`compress.prune.flops`
reads the spatial sizes of a walk at its own image size, joining records by conv name.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.blocks import autopad
from ..model.yolo import parse_cfg

BN_KEYS = ("weight", "bias", "running_mean", "running_var")
# thop's op count per output element of nn.Upsample, by mode (0 for modes thop does not count).
_UPSAMPLE_OPS = {"nearest": 1, "linear": 5, "bilinear": 11, "bicubic": 259}


@dataclass
class ConvRecord:
    """One conv (with its BN when ``bn``): what its dims are made of, for slicing and for FLOPs.

    ``out``/``inp`` are layouts (tuples of group indices); ``out`` is empty for Detect convs (their
    ``c_out`` is fixed). ``kind`` is ``conv`` (its output channels are a new set), ``tied`` (its output
    channels are an existing layout's: squeeze-excitation's expand conv), ``dw`` (depthwise: dim 0 follows
    the input, dim 1 is 1), ``grouped`` (fixed groups > 1) or ``detect``. ``weight``, ``bias`` and ``bn``
    are its state_dict key, its bias key (or None) and the prefix of its BatchNorm (or None).
    """

    prefix: str
    layer: int
    kind: str
    out: tuple
    inp: tuple
    c_out: int
    c_in: int
    groups: int
    kk: int
    hw_out: int
    weight: str = ""
    bias: str | None = None
    bn: str | None = None

    @property
    def bn_keys(self) -> list:
        """The state_dict keys of its BatchNorm (dim 0 follows the conv's output)."""
        return [f"{self.bn}.{k}" for k in BN_KEYS] if self.bn else []

    @property
    def dim0_keys(self) -> list:
        """Every key whose dim 0 is the conv's output channels: bias and BN, besides the weight."""
        return ([self.bias] if self.bias else []) + self.bn_keys


@dataclass
class ChannelOpRecord:
    """An op costing ``ops`` per channel of ``layout`` (thop's count at the walked size): an nn.Upsample
    (ops per output element x output size) or a global average pool (input size + 1)."""

    name: str
    layer: int
    layout: tuple
    ops: float


def hw_of(imgsz) -> tuple:
    """``imgsz`` (an int or (h, w)) as an (h, w) tuple of ints."""
    if isinstance(imgsz, int):
        return (imgsz, imgsz)
    h, w = imgsz
    return (int(h), int(w))


def _conv_hw(hw, k, s, p, d):
    ks = (k, k) if isinstance(k, int) else tuple(k)
    ss = (s, s) if isinstance(s, int) else tuple(s)
    ps = autopad(k, p, d)
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    return tuple((x + 2 * pp - d * (kk - 1) - 1) // st + 1 for x, kk, st, pp in zip(hw, ks, ss, ps))


def _pool_hw(hw, k, s, p):
    return tuple((x + 2 * p - k) // s + 1 for x in hw)


class Walker:
    """Walks the layer specs once, creating channel sets, merging residual ones and recording convs.

    The block rules (:mod:`compress.model.rules`) call its primitives: :meth:`conv` (a conv + BN making a
    new channel set, or writing an existing layout's), :meth:`dw` (a depthwise conv its input's channels
    pass through), :meth:`squeeze_excite`, :meth:`new`, :meth:`residual` (an add joining two layouts),
    :meth:`fix` (channels that must stay), :meth:`upsample`, :meth:`global_pool`, :meth:`detect_conv`,
    :meth:`path` (where a width is written in the YAML) and :meth:`add_path`.
    """

    def __init__(self, specs, normal, h, w):
        self.specs, self.normal = specs, normal
        self.nb = len(normal["backbone"])
        self.parent, self.size, self.label = [], [], []
        self.paths, self.fixed = {}, {}
        self.convs, self.channel_ops = [], []
        self.layer_out, self.layer_hw = [], []
        image = self.new(specs[0].p["c1"], label="input", fixed="image input")
        hw = (h, w)
        for s in specs:
            if s.i == 0:
                lay, hw_in = (image,), hw
            elif isinstance(s.f, int):
                lay, hw_in = self.layer_out[s.f], self.layer_hw[s.f]
            else:
                lay, hw_in = None, None
            out, hw_out = s.rule.walk_row(self, s, lay, hw_in)
            self.layer_out.append(out)
            self.layer_hw.append(hw_out)

    # --- channel sets -------------------------------------------------------------------------------
    @property
    def n_sets(self) -> int:
        """How many channel sets exist so far (sets made later have larger ids)."""
        return len(self.parent)

    def new(self, size, path=None, label=None, fixed=None, scale=1):
        """A new channel set of ``size`` channels (``fixed``: the reason it cannot be pruned), its width
        written at ``path`` in the YAML (times ``scale``)."""
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.label.append(label)
        self.paths[i] = [(path, scale)] if path is not None else []
        if fixed:
            self.fixed[i] = fixed
        return i

    def find(self, i):
        """The representative of set ``i`` (union-find)."""
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a, b):
        """Merge two sets of equal size into one (their channels are added elementwise)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise AssertionError(f"residual add of {self.size[ra]} and {self.size[rb]} channels")
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.paths[lo] += self.paths.pop(hi)
        if hi in self.fixed:
            self.fixed.setdefault(lo, self.fixed.pop(hi))

    def residual(self, a: tuple, b: tuple, where: str) -> None:
        """An add of layouts ``a`` and ``b``: merged set by set where they line up, else both kept whole."""
        if len(a) == len(b) and all(self.size[self.find(x)] == self.size[self.find(y)] for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self.union(x, y)
        else:
            self.fix(tuple(a) + tuple(b), f"residual add of a concat in {where}")

    def fix(self, layout, reason):
        """Mark the sets of ``layout`` as not prunable, for ``reason``."""
        for i in layout:
            self.fixed.setdefault(self.find(i), reason)

    def width(self, layout) -> int:
        """Channels of a layout."""
        return sum(self.size[i] for i in layout)

    def add_path(self, layout, path, scale=1) -> None:
        """Another YAML place that writes the width of ``layout`` (one set; else the layout is fixed)."""
        if len(layout) == 1:
            self.paths[self.find(layout[0])].append((path, scale))
        else:
            self.fix(layout, f"a width written once for a concat ({path})")

    def path(self, layer, *rest):
        """The path of a width in the normal-form YAML: ``(section, row, 3, *rest)``; a first ``-1`` in
        ``rest`` is the row's trailing dict of explicit widths."""
        sec, row = ("backbone", layer) if layer < self.nb else ("head", layer - self.nb)
        args = self.normal[sec][row][3]
        rest = tuple(len(args) - 1 if r == -1 and j == 0 else r for j, r in enumerate(rest))
        return (sec, row, 3, *rest)

    # --- records ------------------------------------------------------------------------------------
    def conv(self, prefix, layer, inp, c_out, hw_in, k=1, s=1, p=None, g=1, d=1, path=None, weight=None,
             bias=None, bn="", out=None, scale=1, parts=1):
        """A conv (+ BN) creating a new channel set of ``c_out`` channels; returns ``(set, hw_out)``.

        Keys default to a YOLOv5 Conv's (``PREFIX.conv.weight``, BN ``PREFIX.bn``); give ``weight``,
        ``bias`` and ``bn`` (None for no BN) for raw layers. ``out``: an existing layout the conv's output
        channels are instead of a new set (squeeze-excitation's expand conv; returns ``(None, hw_out)``).
        ``scale``: the YAML writes ``scale`` x the set's width at ``path`` (a Ghost module's two halves).
        ``parts``: the output is ``parts`` equal new sets (returned as a layout), so that an add can pair
        each with a set of its own (a projection shortcut beside a Ghost module's two halves).
        """
        c_in = self.width(inp)
        hw_out = _conv_hw(hw_in, k, s, p, d)
        weight = weight or f"{prefix}.conv.weight"
        bn = f"{prefix}.bn" if bn == "" else bn
        kk = k * k if isinstance(k, int) else k[0] * k[1]
        if out is not None:
            self.convs.append(ConvRecord(prefix, layer, "tied", tuple(out), tuple(inp), self.width(out), c_in, 1, kk,
                                         hw_out[0] * hw_out[1], weight, bias, bn))
            return None, hw_out
        sets = tuple(self.new(c_out // parts, path if parts == 1 else None, label=prefix, scale=scale)
                     for _ in range(parts))
        kind = "conv"
        if g > 1:
            kind = "grouped"
            self.fix(inp, f"grouped conv {prefix}")
            self.fix(sets, f"grouped conv {prefix}")
        self.convs.append(ConvRecord(prefix, layer, kind, sets, tuple(inp), c_out, c_in, g, kk,
                                     hw_out[0] * hw_out[1], weight, bias, bn))
        return (sets[0] if parts == 1 else sets), hw_out

    def dw(self, prefix, layer, inp, hw_in, k=3, s=1, weight=None, bias=None, bn="", p=None):
        """A depthwise conv (groups = channels): its channels are its input's; returns hw_out (keys as conv)."""
        c = self.width(inp)
        hw_out = _conv_hw(hw_in, k, s, p, 1)
        weight = weight or f"{prefix}.conv.weight"
        bn = f"{prefix}.bn" if bn == "" else bn
        self.convs.append(ConvRecord(prefix, layer, "dw", tuple(inp), tuple(inp), c, c, c, k * k,
                                     hw_out[0] * hw_out[1], weight, bias, bn))
        return hw_out

    def detect_conv(self, prefix, layer, inp, c_out, hw):
        """One of Detect's 1x1 convs (with bias, no BN; its outputs are fixed)."""
        self.convs.append(ConvRecord(prefix, layer, "detect", (), tuple(inp), c_out, self.width(inp), 1, 1,
                                     hw[0] * hw[1], f"{prefix}.weight", f"{prefix}.bias", None))

    def upsample(self, layer, layout, hw, mode="nearest"):
        """An nn.Upsample of ``layout`` to ``hw`` (thop counts ops per output element by mode)."""
        self.channel_ops.append(ChannelOpRecord(f"model.{layer}", layer, layout,
                                                hw[0] * hw[1] * _UPSAMPLE_OPS.get(mode, 0)))

    def global_pool(self, name, layer, layout, hw_in):
        """An nn.AdaptiveAvgPool2d(1) over ``layout`` (thop: input size + 1 ops per channel)."""
        self.channel_ops.append(ChannelOpRecord(name, layer, layout, hw_in[0] * hw_in[1] + 1))

    def squeeze_excite(self, prefix, layer, lay, hw, path, reduce=None):
        """A SeBlock over ``lay`` at ``prefix`` (``.Excitation.FC1/FC2``, convs with bias, no BN): its
        squeeze width is a new prunable set written at ``path``; the expand conv's output is ``lay`` itself.
        ``reduce`` is the squeeze width (the YAML's). Returns nothing: the block's output layout is ``lay``."""
        self.global_pool(f"{prefix}.Squeeze", layer, lay, hw)
        fc1, fc2 = f"{prefix}.Excitation.FC1", f"{prefix}.Excitation.FC2"
        r, _ = self.conv(fc1, layer, lay, reduce, (1, 1), path=path, weight=f"{fc1}.weight", bias=f"{fc1}.bias",
                         bn=None)
        self.conv(fc2, layer, (r,), None, (1, 1), weight=f"{fc2}.weight", bias=f"{fc2}.bias", bn=None, out=lay)

    @staticmethod
    def pool_hw(hw, k, s, p):
        """Output size of a k x k pooling with stride s and padding p."""
        return _pool_hw(hw, k, s, p)


def walk(cfg, imgsz=640) -> Walker:
    """Walk a model YAML (a path, a dict or a normal form) at ``imgsz`` (an int or (h, w))."""
    specs, normal = parse_cfg(cfg)
    h, w = hw_of(imgsz)
    return Walker(specs, normal, h, w)
