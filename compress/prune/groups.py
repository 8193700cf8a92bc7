"""Channel groups: the sets of channels that must be pruned together, derived from the normal-form YAML.

Every conv output in a YOLOv5 model is a *channel set*; a residual add (C3 with shortcut, a standalone
Bottleneck with shortcut) merges the sets it adds into one. The merged sets are the groups. Each conv
input is a *layout*: the ordered list of groups that make up its input channels (a Concat lists its
inputs' layouts, SPPF/SPP list cv1's group 4 times, Upsample and max-pools pass their input through).
Pruning a group selects the same channel indices in every tensor whose dim 0 is the group (producer
conv weights, their BN weight/bias/running stats, depthwise convs it passes through) and, at the
matching offsets, in dim 1 of every conv that consumes it (Detect's convs included).

Rules per block type live in :class:`_Walker`; they are exact for the shipped configs and general for
any YAML of these blocks. Channels that cannot be pruned safely form groups with ``prunable=False``
and a ``reason`` (the image, ShuffleBlock outputs, inputs of a ShuffleBlock chunk, grouped convs,
rows repeated with ``number > 1`` outside C3/ShuffleBlock).

ShuffleNetV2 blocks: the hidden width of every ``branch2`` (pointwise -> depthwise -> pointwise) is its
own group, one per repeat; the input of a stride-2 block (e.g. the Conv_maxpool stem) is prunable, its
``branch1`` depthwise conv passing the channels through. Block outputs are *not* pruned: the chunk(2)
halves and the channel shuffle would couple channels across a whole stage.

Groups depend on the architecture only, so compute them once (``channel_groups(model)``) and reuse them
for any state_dict of that architecture and any number of plans.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import UserError
from ..model.blocks import (
    C3, SPP, SPPF, Bottleneck, Concat, Conv, Conv_maxpool, Detect, Focus, ShuffleBlock, autopad,
)
from ..model.yolo import parse_cfg

BN_KEYS = ("weight", "bias", "running_mean", "running_var")
# thop's op count per output element of nn.Upsample, by mode (0 for modes thop does not count).
_UPSAMPLE_OPS = {"nearest": 1, "linear": 5, "bilinear": 11, "bicubic": 259}


@dataclass(frozen=True)
class Consumer:
    """A tensor that takes a group's channels on dim 1 (input channels), at ``offsets`` (original coords).

    SPPF's cv2 lists cv1's group 4 times, so its consumer has 4 offsets (``repeat`` = 4).
    """

    key: str
    offsets: tuple
    dim: int = 1

    @property
    def repeat(self) -> int:
        """How many times the group's channels appear in this tensor's dim 1."""
        return len(self.offsets)


@dataclass(frozen=True)
class Group:
    """A set of channels pruned together.

    ``producers``: state_dict keys whose dim 0 is exactly this group's channels (conv weights, BN
    weight/bias/running_mean/running_var, depthwise convs the channels pass through). ``consumers``: conv
    weights taking the channels on dim 1. ``yaml_paths``: paths into the normal-form YAML (e.g.
    ``("backbone", 2, 3, 3, "cv1")``) whose number equals ``size``. ``modules``: the conv modules that
    create the channels (``model.2.cv1``, ``model.2.m.0.cv2``: what ``--exclude`` matches), ``layers``
    their layer indices. ``prunable`` is False with a ``reason`` for channels that must stay.
    """

    index: int
    name: str
    size: int
    producers: tuple
    consumers: tuple
    yaml_paths: tuple
    modules: tuple
    layers: tuple
    prunable: bool = True
    reason: str = ""


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


@dataclass
class ChannelGroups:
    """The channel groups of one architecture (see the module docstring).

    ``groups`` lists every group (prunable or not) in model order; ``prunable`` the ones a plan may prune;
    ``by_name`` maps names to groups. ``cfg`` is the normal-form YAML the groups were derived from.
    """

    cfg: dict
    groups: list
    convs: list            # ConvRecord, in model order
    upsamples: list        # UpsampleRecord
    layer_out: list        # per layer: output layout (tuple of group indices); () for Detect
    layer_types: list      # per layer: module name
    nb: int                # number of backbone rows
    slices: dict = field(default_factory=dict, repr=False)  # see layouts()
    _cost_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def prunable(self) -> list:
        """The groups a plan may prune."""
        return [g for g in self.groups if g.prunable]

    @functools.cached_property
    def by_name(self) -> dict:
        """Group name -> Group."""
        return {g.name: g for g in self.groups}

    @property
    def sizes(self) -> list:
        """Original channel count of every group, indexed like ``groups``."""
        return [g.size for g in self.groups]

    def cost_model(self, imgsz=640):
        """The (cached) :class:`compress.prune.flops.CostModel` of this architecture at ``imgsz``."""
        from .flops import CostModel

        key = _hw(imgsz)
        if key not in self._cost_cache:
            self._cost_cache[key] = CostModel(self, key)
        return self._cost_cache[key]

    def exclude(self, patterns) -> "ChannelGroups":
        """A copy in which the groups matched by ``patterns`` are not prunable.

        A pattern is a group name, a layer index (``"0"``), or a module path (``"model.0"``,
        ``"model.2.m.0"``) matching the groups whose channels a conv inside it creates. A pattern that
        matches no prunable group raises UserError.
        """
        names = resolve_excludes(self, patterns)
        if not names:
            return self
        groups = [dataclasses.replace(g, prunable=False, reason="excluded") if g.name in names else g
                  for g in self.groups]
        return dataclasses.replace(self, groups=groups, slices=self.slices, _cost_cache=self._cost_cache)

    def layouts(self):
        """``{state_dict key: (dim-0 layout or None, dim-1 layout or None)}`` for every sliceable tensor."""
        out = {}
        for r in self.convs:
            d0 = r.out if r.kind in ("conv", "dw") else None
            d1 = r.inp if r.kind in ("conv", "detect") else None
            out[r.weight] = (d0, d1)
            for k in r.bn_keys:
                out[k] = (d0, None)
        return out


def channel_groups(model_or_cfg) -> ChannelGroups:
    """The channel groups of a built :class:`~compress.model.yolo.Model`, a YAML path or a cfg dict.

    Works from the YAML alone (no tracing); the result is reusable for every state_dict and plan of
    that architecture.
    """
    specs, normal = parse_cfg(getattr(model_or_cfg, "yaml", model_or_cfg))
    return _Walker(specs, normal, 640, 640).finish()


def resolve_excludes(cg: ChannelGroups, patterns) -> set:
    """Names of the prunable groups matched by ``patterns`` (see :meth:`ChannelGroups.exclude`).

    ``patterns`` may be a string (comma-separated) or a list of strings. Raises UserError for a pattern
    that matches no prunable group.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    items = [p.strip() for x in (patterns or []) for p in str(x).split(",") if p.strip()]
    names = set()
    for pat in items:
        mod = f"model.{pat}" if pat.isdigit() else pat
        hit = {g.name for g in cg.prunable
               if pat == g.name or any(m == mod or m.startswith(mod + ".") for m in g.modules)}
        if not hit:
            last = len(cg.layer_out) - 1
            raise UserError(f"--exclude {pat}: matches no prunable channel group (give a layer index 0-{last}, "
                            f"a module path like model.2.cv1, or a group name; Detect outputs are never pruned)")
        names |= hit
    return names


def _hw(imgsz):
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


class _Walker:
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

    # --- result -------------------------------------------------------------------------------------
    def finish(self) -> ChannelGroups:
        roots = sorted({self._find(i) for i in range(len(self.parent))})
        index = {r: k for k, r in enumerate(roots)}

        def remap(layout):
            return tuple(index[self._find(x)] for x in layout)

        for r in self.convs:
            r.out, r.inp = remap(r.out), remap(r.inp)
        for u in self.upsamples:
            u.layout = remap(u.layout)
        layer_out = [remap(x) for x in self.layer_out]

        producers = {k: [] for k in range(len(roots))}
        modules = {k: [] for k in range(len(roots))}
        layers = {k: [] for k in range(len(roots))}
        consumers = {k: {} for k in range(len(roots))}
        for r in self.convs:
            if r.kind in ("conv", "dw", "grouped") and len(r.out) == 1:
                g = r.out[0]
                producers[g] += [r.weight] + r.bn_keys
                if r.kind != "dw":
                    modules[g].append(r.prefix)
                    layers[g].append(r.layer)
            if r.kind in ("conv", "detect"):
                off = 0
                for g in r.inp:
                    consumers[g].setdefault(r.weight, []).append(off)
                    off += self.size[roots[g]]
        groups = []
        for k, root in enumerate(roots):
            mods = modules[k]
            name = mods[0] if mods else (self.label[root] or f"set{k}")
            reason = self.fixed.get(root, "")
            if not reason and not self.paths[root]:
                reason = "no YAML width"
            if not reason and not mods:
                reason = "no producer conv"
            groups.append(Group(
                index=k, name=name, size=self.size[root], producers=tuple(producers[k]),
                consumers=tuple(Consumer(key, tuple(offs)) for key, offs in consumers[k].items()),
                yaml_paths=tuple(self.paths[root]), modules=tuple(mods), layers=tuple(sorted(set(layers[k]))),
                prunable=not reason, reason=reason,
            ))
        cg = ChannelGroups(cfg=self.normal, groups=groups, convs=self.convs, upsamples=self.upsamples,
                           layer_out=layer_out, layer_types=[s.type for s in self.specs], nb=self.nb)
        cg.slices = cg.layouts()
        return cg
