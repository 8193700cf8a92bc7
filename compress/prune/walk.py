"""The walk over a normal-form YAML's layers: every conv's channel sets and spatial size, once.

One pass over the layer specs (:func:`walk`) creates a channel set per conv output, merges the sets a
residual add joins (union-find), records every conv (:class:`ConvRecord`: its input layout, output set,
kernel and output size at the walked image size) and every nn.Upsample (:class:`UpsampleRecord`). The
rules per block type live here and only here; :mod:`compress.prune.groups` turns a walk into channel
groups and :mod:`compress.prune.flops` reads the spatial sizes of a walk at its own image size, joining
records by conv name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..model.blocks import (
    C3, SPP, SPPF, Bottleneck, Concat, Conv, Conv_maxpool, Detect, Focus, ShuffleBlock, autopad,
)
from ..model.yolo import parse_cfg

BN_KEYS = ("weight", "bias", "running_mean", "running_var")
# thop's op count per output element of nn.Upsample, by mode (0 for modes thop does not count).
_UPSAMPLE_OPS = {"nearest": 1, "linear": 5, "bilinear": 11, "bicubic": 259}


@dataclass
class ConvRecord:
    """One conv (with its BN when ``bn``): what its dims are made of, for slicing and for FLOPs.

    ``out``/``inp`` are layouts (tuples of group indices); ``out`` is empty for Detect convs (their
    ``c_out`` is fixed). ``kind`` is ``conv``, ``dw`` (depthwise: dim 0 follows the input, dim 1 is 1),
    ``grouped`` (fixed groups > 1) or ``detect``.
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
    bn: bool = True
    bias: bool = False

    @property
    def weight(self) -> str:
        return f"{self.prefix}.weight" if self.kind == "detect" else f"{self.prefix}.conv.weight"

    @property
    def bn_keys(self) -> list:
        return [f"{self.prefix}.bn.{k}" for k in BN_KEYS] if self.bn else []


@dataclass
class UpsampleRecord:
    """An nn.Upsample: thop counts ``ops_per_elem`` per output element."""

    layer: int
    layout: tuple
    hw_out: int
    ops_per_elem: int


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
    """Walks the layer specs once, creating channel sets, merging residual ones and recording convs."""

    def __init__(self, specs, normal, h, w):
        self.specs, self.normal = specs, normal
        self.nb = len(normal["backbone"])
        self.parent, self.size, self.label = [], [], []
        self.paths, self.fixed = {}, {}
        self.convs, self.upsamples = [], []
        self.layer_out, self.layer_hw = [], []
        image = self._new(specs[0].args[0], label="input", fixed="image input")
        hw = (h, w)
        for s in specs:
            if s.i == 0:
                lay, hw_in = (image,), hw
            elif isinstance(s.f, int):
                lay, hw_in = self.layer_out[s.f], self.layer_hw[s.f]
            else:
                lay, hw_in = None, None
            out, hw_out = self._layer(s, lay, hw_in)
            self.layer_out.append(out)
            self.layer_hw.append(hw_out)

    # --- channel sets -------------------------------------------------------------------------------
    def _new(self, size, path=None, label=None, fixed=None):
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.label.append(label)
        self.paths[i] = [path] if path is not None else []
        if fixed:
            self.fixed[i] = fixed
        return i

    def _find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _union(self, a, b):
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise AssertionError(f"residual add of {self.size[ra]} and {self.size[rb]} channels")
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.paths[lo] += self.paths.pop(hi)
        if hi in self.fixed:
            self.fixed.setdefault(lo, self.fixed.pop(hi))

    def _fix(self, layout, reason):
        for i in layout:
            self.fixed.setdefault(self._find(i), reason)

    def _path(self, layer, *rest):
        sec, row = ("backbone", layer) if layer < self.nb else ("head", layer - self.nb)
        args = self.normal[sec][row][3]
        rest = tuple(len(args) - 1 if r == -1 and j == 0 else r for j, r in enumerate(rest))
        return (sec, row, 3, *rest)

    # --- records ------------------------------------------------------------------------------------
    def _conv(self, prefix, layer, inp, c_out, hw_in, k=1, s=1, p=None, g=1, d=1, path=None):
        """A Conv (conv + bn) creating a new channel set; returns (set, hw_out)."""
        c_in = sum(self.size[i] for i in inp)
        hw_out = _conv_hw(hw_in, k, s, p, d)
        out = self._new(c_out, path, label=prefix)
        kind = "conv"
        if g > 1:
            kind = "grouped"
            self._fix(inp, f"grouped conv {prefix}")
            self._fix((out,), f"grouped conv {prefix}")
        kk = k * k if isinstance(k, int) else k[0] * k[1]
        self.convs.append(ConvRecord(prefix, layer, kind, (out,), tuple(inp), c_out, c_in, g, kk,
                                     hw_out[0] * hw_out[1]))
        return out, hw_out

    def _dw(self, prefix, layer, inp, hw_in, k=3, s=1):
        """A depthwise Conv (groups = channels): its channels are its input's."""
        c = sum(self.size[i] for i in inp)
        hw_out = _conv_hw(hw_in, k, s, None, 1)
        self.convs.append(ConvRecord(prefix, layer, "dw", tuple(inp), tuple(inp), c, c, c, k * k,
                                     hw_out[0] * hw_out[1]))
        return hw_out

    # --- rules per block ------------------------------------------------------------------------------
    def _layer(self, s, lay, hw_in):
        cls, P, i = s.cls, f"model.{s.i}", s.i
        if cls is Concat:
            out = tuple(x for j in s.f for x in self.layer_out[j])
            return out, self.layer_hw[s.f[0]]
        if cls is Detect:
            for k, j in enumerate(s.f):
                hw = self.layer_hw[j]
                inp = self.layer_out[j]
                self.convs.append(ConvRecord(f"{P}.m.{k}", i, "detect", (), inp, s.c_out,
                                             sum(self.size[x] for x in inp), 1, 1, hw[0] * hw[1],
                                             bn=False, bias=True))
            return (), hw_in
        if cls is nn.Upsample:
            size, sf, mode = (list(s.args) + [None, None, "nearest"])[:3]
            if size is not None:
                sz = (size, size) if isinstance(size, int) else tuple(size)
                hw = tuple(int(v) for v in sz)
            else:
                sfs = (sf, sf) if not isinstance(sf, (list, tuple)) else tuple(sf)
                hw = tuple(int(x * f) for x, f in zip(hw_in, sfs))
            self.upsamples.append(UpsampleRecord(i, lay, hw[0] * hw[1], _UPSAMPLE_OPS.get(mode or "nearest", 0)))
            return lay, hw
        if cls is ShuffleBlock:
            c2, stride = s.args[1], s.args[2]
            hidden = s.kwargs["hidden"]
            out, hw = lay, hw_in
            for j, h in enumerate(hidden):
                pre = P if s.n == 1 else f"{P}.{j}"
                out, hw = self._shuffle(pre, i, out, hw, c2, stride, h, self._path(i, -1, "hidden", j))
            return out, hw
        if s.n > 1 and cls is not C3:
            start = len(self.parent)
            out, hw = lay, hw_in
            for j in range(s.n):
                out, hw = self._block(s, f"{P}.{j}", out, hw)
            self._fix(lay, f"input of repeated row {i}")
            self._fix(range(start, len(self.parent)), f"repeated row {i} (number > 1)")
            return out, hw
        return self._block(s, P, lay, hw_in)

    def _block(self, s, P, lay, hw_in):
        cls, i, a = s.cls, s.i, s.args
        if cls is Conv:
            k, st, p, g, d = (list(a[2:7]) + [1, 1, None, 1, 1][len(a[2:7]):])
            o, hw = self._conv(P, i, lay, a[1], hw_in, k, st, p, g, d, path=self._path(i, 0))
            return (o,), hw
        if cls is Focus:
            k, st, p, g = (list(a[2:6]) + [1, 1, None, 1][len(a[2:6]):])
            hw_in = tuple((x + 1) // 2 for x in hw_in)
            o, hw = self._conv(f"{P}.conv", i, lay * 4, a[1], hw_in, k, st, p, g, path=self._path(i, 0))
            return (o,), hw
        if cls is Conv_maxpool:
            o, hw = self._conv(f"{P}.conv", i, lay, a[1], hw_in, 3, 2, path=self._path(i, 0))
            return (o,), _pool_hw(hw, 3, 2, 1)
        if cls is C3:
            shortcut = a[3] if len(a) > 3 else True
            g = a[4] if len(a) > 4 else 1
            kw = s.kwargs
            x, hw = self._conv(f"{P}.cv1", i, lay, kw["c_cv1"], hw_in, path=self._path(i, -1, "cv1"))
            y, _ = self._conv(f"{P}.cv2", i, lay, kw["c_cv2"], hw_in, path=self._path(i, -1, "cv2"))
            for j, (hid, out) in enumerate(kw["m_ch"]):
                x = self._bottleneck(f"{P}.m.{j}", i, x, hid, out, shortcut, g, hw,
                                     self._path(i, -1, "m", j, 0), self._path(i, -1, "m", j, 1))
            o, hw = self._conv(f"{P}.cv3", i, (x, y), a[1], hw, path=self._path(i, 0))
            return (o,), hw
        if cls is Bottleneck:
            c1, c2 = a[0], a[1]
            shortcut = a[2] if len(a) > 2 else True
            g = a[3] if len(a) > 3 else 1
            h, _ = self._conv(f"{P}.cv1", i, lay, s.kwargs["c_"], hw_in, path=self._path(i, -1, "cv1"))
            o, hw = self._conv(f"{P}.cv2", i, (h,), c2, hw_in, 3, 1, g=g, path=self._path(i, 0))
            if shortcut and c1 == c2:
                if len(lay) == 1:
                    self._union(lay[0], o)
                else:
                    self._fix(lay + (o,), f"residual add of a concat in {P}")
            return (o,), hw
        if cls in (SPPF, SPP):
            c, hw = self._conv(f"{P}.cv1", i, lay, s.kwargs["c_"], hw_in, path=self._path(i, -1, "cv1"))
            k = a[2] if len(a) > 2 else (5 if cls is SPPF else (5, 9, 13))
            copies = 4 if cls is SPPF else len(k) + 1
            o, hw = self._conv(f"{P}.cv2", i, (c,) * copies, a[1], hw, path=self._path(i, 0))
            return (o,), hw
        raise AssertionError(f"no channel rule for {cls.__name__}")

    def _bottleneck(self, P, i, x, hid, out, shortcut, g, hw, hid_path, out_path):
        h, _ = self._conv(f"{P}.cv1", i, (x,), hid, hw, path=hid_path)
        o, _ = self._conv(f"{P}.cv2", i, (h,), out, hw, 3, 1, g=g, path=out_path)
        if shortcut and self.size[self._find(x)] == out:
            self._union(x, o)
        return o

    def _shuffle(self, P, i, lay, hw_in, c2, stride, hidden, hidden_path):
        half = c2 // 2
        reason = f"ShuffleBlock output {P} (chunk + channel shuffle)"
        if stride == 2:
            if len(lay) > 1:
                self._fix(lay, f"input of {P} (a concat feeding a depthwise conv)")
            hw_b = self._dw(f"{P}.branch1.0", i, lay, hw_in, 3, 2)
            b1, _ = self._conv(f"{P}.branch1.1", i, lay, half, hw_b)
            self._fix((b1,), reason)
            inp = lay
        else:
            self._fix(lay, f"input of {P} (split by chunk(2))")
            c_in = sum(self.size[x] for x in lay)
            inp = (self._new(c_in - c_in // 2, label=f"{P}.chunk", fixed=f"second half of {P}'s input"),)
        h, _ = self._conv(f"{P}.branch2.0", i, inp, hidden, hw_in, path=hidden_path)
        hw = self._dw(f"{P}.branch2.1", i, (h,), hw_in, 3, stride)
        b2, _ = self._conv(f"{P}.branch2.2", i, (h,), half, hw)
        self._fix((b2,), reason)
        return (self._new(c2, label=f"{P}.out", fixed=reason),), hw


def walk(cfg, imgsz=640) -> Walker:
    """Walk a model YAML (a path, a dict or a normal form) at ``imgsz`` (an int or (h, w))."""
    specs, normal = parse_cfg(cfg)
    h, w = hw_of(imgsz)
    return Walker(specs, normal, h, w)
