"""One rule per block type: everything compress knows about a block, in one place.

A :class:`BlockRule` says, for the module names a YAML row may use:

- how the row's args parse (named fields after the output width, never positions read back later) and
  which inner widths the explicit-channel normal form writes out (:meth:`BlockRule.parse`);
- its output channels and stride, and the module built from the parsed fields (:meth:`BlockRule.build`);
- its normal form (:meth:`BlockRule.normal_args`);
- which of its widths are prunable and how its channels couple to its input and output: :meth:`walk`
  records every conv it holds on the walker of :mod:`compress.prune.walk`, which the channel groups and
  the cost model (FLOPs equal to thop) are computed from;
- which classes of a pickled checkpoint it is (``pickled``) and what such a pickled module must look like
  (:meth:`check_pickled`).

Adding a block is one rule here (plus its module in :mod:`compress.model.blocks` and its tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from ..errors import UserError
from . import blocks as B
from . import light as L


# ------------------------------------------------------------------------------------ field checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def pos_int(v) -> bool:
    """A positive integer."""
    return _is_int(v) and v >= 1


def kernel(v) -> bool:
    """A positive kernel size, or a (kh, kw) pair of them."""
    return pos_int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(pos_int(x) for x in v))


def padding(v) -> bool:
    """None (same padding) or an integer >= 0."""
    return v is None or (_is_int(v) and v >= 0)


def flag(v) -> bool:
    """True/False (or the 0/1 YAMLs write)."""
    return isinstance(v, bool) or v in (0, 1)


def ratio(v) -> bool:
    """A number in (0, 1]."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


def odd_kernel(v) -> bool:
    """A positive odd kernel size (a max-pool that keeps the size)."""
    return pos_int(v) and v % 2 == 1


def odd_kernels(v) -> bool:
    """A list of positive odd kernel sizes."""
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(odd_kernel(x) for x in v)


def stride_1_or_2(v) -> bool:
    """1 or 2."""
    return v in (1, 2) and not isinstance(v, bool)


def make_divisible(x, divisor=8):
    """Smallest multiple of ``divisor`` that is >= x (ultralytics' width rounding)."""
    return math.ceil(x / divisor) * divisor


@dataclass
class RowContext:
    """What parsing one YAML row knows: its place, its resolved args and the widths before it."""

    i: int                 # layer index
    f: int | list          # from
    n: int                 # repeats (depth multiple applied)
    name: str              # module name as written
    args: list             # args with nc / anchors / None / True / False resolved
    c1: int | None         # input width (None for multi-input rows)
    ch: list               # output width of every earlier layer
    gw: float              # width multiple (1.0 in the normal form)
    no: int                # outputs per Detect level, na * (nc + 5): never scaled
    explicit: bool         # the YAML is in normal form: widths are read literally
    nc: int


@dataclass
class LayerSpec:
    """One parsed YAML row: its rule, its named parameters and what it produces."""

    i: int
    f: int | list
    n: int
    type: str              # module name as the normal form writes it
    rule: "BlockRule"
    p: dict                # named parameters: c1, c2, n and the rule's fields and inner widths
    c_out: int = 0
    stride: float = 1.0    # total downsampling at this layer's output

    @property
    def cls(self) -> type:
        """The block's module class."""
        return self.rule.module

    def build(self) -> nn.Module:
        """The module of this row (``n`` chained copies for a block that does not repeat inside)."""
        return self.rule.build_row(self)


class BlockRule:
    """Base rule: a block with one input whose first arg is its output width (Conv-like).

    Subclasses set the class attributes and override what differs. ``fields`` are ``(name, default, check)``
    of the args after the output width, in YAML order (``check`` a predicate whose docstring says what is
    expected); ``widths`` the keys of the trailing dict of explicit
    inner widths; ``scaled``: the output width is scaled by width_multiple as ultralytics' parse_model does;
    ``repeats``: ``"chain"`` (``number`` copies, each taking the previous one's output), ``"inside"``
    (the block repeats inside, like C3's bottlenecks) or ``"own"`` (the block builds its repeats itself).
    """

    names: tuple = ()
    module: type = None
    fields: tuple = ()
    widths: tuple = ()
    extras: tuple = ()  # other keys of the trailing dict (not widths), e.g. a block's structure flag
    scaled: bool = True
    repeats: str = "chain"
    pickled: tuple = ()
    pickled_renames: dict = {}  # state-dict key prefixes of the pickled class -> ours (same tensors)
    pickled_parts: dict = {}  # pickled class -> the sub-modules every pickled instance of it holds

    # --------------------------------------------------------------------------------- parsing
    def parse(self, ctx: RowContext):
        """``(LayerSpec, normal-form args, normal-form number)`` of a row; UserError for bad args."""
        if ctx.c1 is None:
            raise UserError(f"{ctx.name} takes one input, got from={ctx.f!r}")
        args, extra = self._split_widths(list(ctx.args))
        if not args or isinstance(args[0], bool) or not isinstance(args[0], int) or args[0] < 1:
            raise UserError(f"first arg must be a positive output width, got {args[:1]!r}")
        c2 = args[0]
        if self.scaled and c2 != ctx.no and not ctx.explicit:
            c2 = make_divisible(c2 * ctx.gw, 8)
        rest = args[1:]
        if len(rest) > len(self.fields):
            names = ", ".join(["c2"] + [f[0] for f in self.fields])
            raise UserError(f"{ctx.name} takes at most {len(self.fields) + 1} args ({names}), got {len(args)}")
        p = {"c1": ctx.c1, "c2": c2, "n": ctx.n}
        for k, (f, d, ok) in enumerate(self.fields):
            v = rest[k] if k < len(rest) else d
            if not ok(v):
                raise UserError(f"{ctx.name} arg {f}={v!r}: expected {ok.__doc__.strip().rstrip('.').lower()}")
            p[f] = v
        p.update(self.inner_widths(p, extra))
        for key in self.widths:
            for v in _flat(p.get(key)):
                if not pos_int(v):
                    raise UserError(f"{ctx.name} width {key}={p.get(key)!r}: widths must be positive integers")
        self.check(p, ctx)
        if ctx.n > 1 and self.repeats == "chain" and p["c1"] != c2:
            raise UserError(f"repeating {ctx.name} {ctx.n} times needs input width == output width")
        spec = LayerSpec(ctx.i, ctx.f, ctx.n, self.names[0], self, p, self.out_channels(p))
        return spec, self.normal_args(p, rest), ctx.n

    def _split_widths(self, args):
        if args and isinstance(args[-1], dict):
            extra = args[-1]
            allowed = self.widths + self.extras
            unknown = set(extra) - set(allowed)
            if unknown:
                raise UserError(f"unknown width key(s) {sorted(unknown)} (allowed: {', '.join(allowed) or 'none'})")
            return args[:-1], extra
        return args, {}

    def inner_widths(self, p: dict, extra: dict) -> dict:
        """The block's inner widths: the explicit ones from ``extra``, else their defaults."""
        return {}

    def check(self, p: dict, ctx: RowContext) -> None:
        """Raise UserError for parameters the block cannot be built with."""

    def out_channels(self, p: dict) -> int:
        """The block's output width."""
        return p["c2"]

    def normal_args(self, p: dict, rest: list) -> list:
        """The row's args in the explicit-channel normal form (``rest``: the args after c2 as written)."""
        return [p["c2"], *rest]

    def stride(self, p: dict) -> float:
        """How much the block downsamples."""
        return 1.0

    # --------------------------------------------------------------------------------- building
    def build(self, p: dict) -> nn.Module:
        """One instance of the block."""
        raise NotImplementedError

    def build_row(self, spec: LayerSpec) -> nn.Module:
        """The row's module: the block, or ``n`` chained copies in an nn.Sequential."""
        if spec.n > 1 and self.repeats == "chain":
            return nn.Sequential(*(self.build(spec.p) for _ in range(spec.n)))
        return self.build(spec.p)

    # --------------------------------------------------------------------------------- channels
    def walk(self, w, p: dict, prefix: str, layer: int, lay: tuple, hw: tuple):
        """Record the block's convs on the walker ``w``; returns ``(output layout, output size)``."""
        raise AssertionError(f"no channel rule for {self.names[0]}")

    def walk_row(self, w, spec: LayerSpec, lay: tuple, hw: tuple):
        """Walk the whole row; chained copies keep their channels (nothing to prune consistently)."""
        prefix = f"model.{spec.i}"
        if spec.n > 1 and self.repeats == "chain":
            start = w.n_sets
            out = lay
            for j in range(spec.n):
                out, hw = self.walk(w, spec.p, f"{prefix}.{j}", spec.i, out, hw)
            w.fix(lay, f"input of repeated row {spec.i}")
            w.fix(range(start, w.n_sets), f"repeated row {spec.i} (number > 1)")
            return out, hw
        return self.walk(w, spec.p, prefix, spec.i, lay, hw)

    # --------------------------------------------------------------------------------- checkpoints
    def check_pickled(self, state: dict, qualname: str) -> str | None:
        """What is wrong with a pickled module of class ``qualname`` (one of ``pickled``; ``state``: its state
        dict of stand-ins), as words that follow "layer 'X' ", or None. Here: a missing ``pickled_parts``."""
        kids = state.get("_modules", {})
        missing = [k for k in self.pickled_parts.get(qualname, ()) if kids.get(k) is None]
        if missing:
            cls = qualname.rsplit(".", 1)[-1]
            return (f"is a {cls} without its '{missing[0]}' sub-module (a damaged file, or another tool's {cls} "
                    f"than the one compress implements)")
        return None


def _flat(v):
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from _flat(x)
    elif v is not None:
        yield v


# ===================================================================================== the rules
class ConvRule(BlockRule):
    """Conv2d + BN + SiLU: ``[c2, k, s, p, g, d, act]``."""

    names = ("Conv",)
    module = B.Conv
    fields = (("k", 1, kernel), ("s", 1, pos_int), ("p", None, padding), ("g", 1, pos_int), ("d", 1, pos_int),
              ("act", True, flag))
    pickled = ("models.common.Conv",)

    def check(self, p, ctx):
        if p["c1"] % p["g"] or p["c2"] % p["g"]:
            raise UserError(f"Conv groups g={p['g']} must divide its input ({p['c1']}) and output ({p['c2']}) widths")

    def build(self, p):
        return B.Conv(p["c1"], p["c2"], p["k"], p["s"], p["p"], p["g"], p["d"], p["act"])

    def stride(self, p):
        return p["s"]

    def walk(self, w, p, prefix, layer, lay, hw):
        o, hw = w.conv(prefix, layer, lay, p["c2"], hw, p["k"], p["s"], p["p"], p["g"], p["d"],
                       path=w.path(layer, 0))
        return (o,), hw

    def check_pickled(self, state, qualname):
        kids = state.get("_modules", {})
        if "bn" not in kids:
            return "is a fused Conv (no BatchNorm); give an unfused checkpoint"
        act = kids.get("act")
        if getattr(act, "qualname", None) not in CONV_ACT_CLASSES:  # Identity: act=False (Ghost blocks' linear Convs)
            return (f"uses activation {getattr(act, 'qualname', type(act).__name__)}; compress's Conv is Conv2d + "
                    f"BatchNorm2d + SiLU (or no activation)")
        return None


class FocusRule(BlockRule):
    """Space-to-depth then a Conv: ``[c2, k, s, p, g, act]``."""

    names = ("Focus",)
    module = B.Focus
    fields = (("k", 1, kernel), ("s", 1, pos_int), ("p", None, padding), ("g", 1, pos_int), ("act", True, flag))
    pickled = ("models.common.Focus",)

    def build(self, p):
        return B.Focus(p["c1"], p["c2"], p["k"], p["s"], p["p"], p["g"], p["act"])

    def stride(self, p):
        return 2 * p["s"]

    def walk(self, w, p, prefix, layer, lay, hw):
        hw = tuple((x + 1) // 2 for x in hw)
        o, hw = w.conv(f"{prefix}.conv", layer, lay * 4, p["c2"], hw, p["k"], p["s"], p["p"], p["g"],
                       path=w.path(layer, 0))
        return (o,), hw


class ConvMaxpoolRule(BlockRule):
    """ShuffleNetV2's stem: Conv 3x3 s2 + BN + ReLU, then MaxPool 3x3 s2: ``[c2]``."""

    names = ("Conv_maxpool", "conv_bn_relu_maxpool")
    module = B.Conv_maxpool
    # the reference tool's Conv_maxpool holds a raw Sequential(Conv2d, BatchNorm2d, ReLU)
    pickled = ("models.common.Conv_maxpool",)
    pickled_parts = {"models.common.Conv_maxpool": ("conv", "maxpool")}
    pickled_renames = {"conv.0.": "conv.conv.", "conv.1.": "conv.bn."}

    def build(self, p):
        return B.Conv_maxpool(p["c1"], p["c2"])

    def stride(self, p):
        return 4.0

    def walk(self, w, p, prefix, layer, lay, hw):
        o, hw = w.conv(f"{prefix}.conv", layer, lay, p["c2"], hw, 3, 2, path=w.path(layer, 0))
        return (o,), w.pool_hw(hw, 3, 2, 1)


class BottleneckRule(BlockRule):
    """cv1 1x1 -> cv2 3x3 (+ input): ``[c2, shortcut, g, e, {cv1}]``."""

    names = ("Bottleneck",)
    module = B.Bottleneck
    fields = (("shortcut", True, flag), ("g", 1, pos_int), ("e", 0.5, ratio))
    widths = ("cv1",)
    pickled = ("models.common.Bottleneck",)

    def inner_widths(self, p, extra):
        return {"cv1": int(extra.get("cv1", int(p["c2"] * p["e"])))}

    def normal_args(self, p, rest):
        return [p["c2"], bool(p["shortcut"]), *rest[1:2], {"cv1": p["cv1"]}]

    def build(self, p):
        return B.Bottleneck(p["c1"], p["c2"], p["shortcut"], p["g"], c_=p["cv1"])

    def walk(self, w, p, prefix, layer, lay, hw):
        h, _ = w.conv(f"{prefix}.cv1", layer, lay, p["cv1"], hw, path=w.path(layer, -1, "cv1"))
        o, hw = w.conv(f"{prefix}.cv2", layer, (h,), p["c2"], hw, 3, 1, g=p["g"], path=w.path(layer, 0))
        if p["shortcut"] and p["c1"] == p["c2"]:
            w.residual(lay, (o,), prefix)
        return (o,), hw


class C3Rule(BlockRule):
    """CSP bottleneck with 3 convs: ``[c2, shortcut, g, e, {cv1, cv2, m: [[hidden, out], ...]}]``."""

    names = ("C3",)
    module = B.C3
    fields = (("shortcut", True, flag), ("g", 1, pos_int), ("e", 0.5, ratio))
    widths = ("cv1", "cv2", "m")
    repeats = "inside"
    pickled = ("models.common.C3",)

    def inner_widths(self, p, extra):
        c_ = int(p["c2"] * p["e"])
        cv1, cv2 = int(extra.get("cv1", c_)), int(extra.get("cv2", c_))
        m = [list(map(int, x)) for x in extra.get("m", [[cv1, cv1]] * p["n"])]
        return {"cv1": cv1, "cv2": cv2, "m": m}

    def check(self, p, ctx):
        if len(p["m"]) != p["n"]:
            raise UserError(f"C3 repeats {p['n']} bottlenecks but lists {len(p['m'])} widths in 'm'")
        cin = p["cv1"]
        for _, out in p["m"]:
            if p["shortcut"] and out != cin:
                raise UserError(f"C3 with shortcut needs every bottleneck output == cv1 ({cin}), got {out}")
            cin = out

    def normal_args(self, p, rest):
        return [p["c2"], bool(p["shortcut"]), *rest[1:2], {"cv1": p["cv1"], "cv2": p["cv2"], "m": p["m"]}]

    def build(self, p):
        return B.C3(p["c1"], p["c2"], p["n"], p["shortcut"], p["g"], c_cv1=p["cv1"], c_cv2=p["cv2"], m_ch=p["m"])

    def walk(self, w, p, prefix, layer, lay, hw):
        x, hw = w.conv(f"{prefix}.cv1", layer, lay, p["cv1"], hw, path=w.path(layer, -1, "cv1"))
        y, _ = w.conv(f"{prefix}.cv2", layer, lay, p["cv2"], hw, path=w.path(layer, -1, "cv2"))
        for j, (hid, out) in enumerate(p["m"]):
            bp = f"{prefix}.m.{j}"
            h, _ = w.conv(f"{bp}.cv1", layer, (x,), hid, hw, path=w.path(layer, -1, "m", j, 0))
            o, _ = w.conv(f"{bp}.cv2", layer, (h,), out, hw, 3, 1, g=p["g"], path=w.path(layer, -1, "m", j, 1))
            if p["shortcut"] and w.width((x,)) == out:
                w.residual((x,), (o,), bp)
            x = o
        o, hw = w.conv(f"{prefix}.cv3", layer, (x, y), p["c2"], hw, path=w.path(layer, 0))
        return (o,), hw


class SPPFRule(BlockRule):
    """cv1, three chained max-pools, concat of the four, cv2: ``[c2, k, {cv1}]``."""

    names = ("SPPF",)
    module = B.SPPF
    fields = (("k", 5, odd_kernel),)
    widths = ("cv1",)
    pickled = ("models.common.SPPF",)

    def inner_widths(self, p, extra):
        return {"cv1": int(extra.get("cv1", p["c1"] // 2))}

    def normal_args(self, p, rest):
        return [p["c2"], p["k"], {"cv1": p["cv1"]}]

    def build(self, p):
        return self.module(p["c1"], p["c2"], p["k"], c_=p["cv1"])

    def n_copies(self, p) -> int:
        """How many times cv1's channels appear in cv2's input."""
        return 4

    def walk(self, w, p, prefix, layer, lay, hw):
        c, hw = w.conv(f"{prefix}.cv1", layer, lay, p["cv1"], hw, path=w.path(layer, -1, "cv1"))
        o, hw = w.conv(f"{prefix}.cv2", layer, (c,) * self.n_copies(p), p["c2"], hw, path=w.path(layer, 0))
        return (o,), hw


class SPPRule(SPPFRule):
    """cv1, parallel max-pools of sizes k, concat, cv2: ``[c2, k, {cv1}]``."""

    names = ("SPP",)
    module = B.SPP
    fields = (("k", [5, 9, 13], odd_kernels),)
    pickled = ("models.common.SPP",)

    def n_copies(self, p):
        return len(p["k"]) + 1


class ShuffleBlockRule(BlockRule):
    """ShuffleNetV2 inverted residual: ``[c2, stride, {hidden: [per repeat]}]``.

    The hidden width of every ``branch2`` is its own group, one per repeat; the input of a stride-2 block
    is prunable (its ``branch1`` depthwise conv passing the channels through). Block outputs are not
    pruned: the chunk(2) halves and the channel shuffle couple channels across a whole stage.
    """

    names = ("ShuffleBlock", "Shuffle_Block")
    module = B.ShuffleBlock
    fields = (("stride", 1, stride_1_or_2),)
    widths = ("hidden",)
    scaled = False
    repeats = "own"

    def inner_widths(self, p, extra):
        hidden = extra.get("hidden", p["c2"] // 2)
        hidden = [int(h) for h in hidden] if isinstance(hidden, list) else [int(hidden)] * p["n"]
        return {"hidden": hidden}

    def check(self, p, ctx):
        if len(p["hidden"]) != p["n"]:
            raise UserError(f"ShuffleBlock repeats {p['n']} times but lists {len(p['hidden'])} 'hidden' widths")
        if p["n"] > 1 and p["stride"] != 1:
            raise UserError("a repeated ShuffleBlock must have stride 1")

    def normal_args(self, p, rest):
        return [p["c2"], p["stride"], {"hidden": p["hidden"]}]

    def stride(self, p):
        return p["stride"]

    def build_row(self, spec):
        p = spec.p
        blocks = [B.ShuffleBlock(p["c1"], p["c2"], p["stride"], hidden=h) for h in p["hidden"]]
        return blocks[0] if spec.n == 1 else nn.Sequential(*blocks)

    def walk_row(self, w, spec, lay, hw):
        p, prefix, i = spec.p, f"model.{spec.i}", spec.i
        out = lay
        for j, h in enumerate(p["hidden"]):
            pre = prefix if spec.n == 1 else f"{prefix}.{j}"
            out, hw = self._one(w, pre, i, out, hw, p["c2"], p["stride"], h, w.path(i, -1, "hidden", j))
        return out, hw

    def keys(self, P: str) -> dict:
        """``{part: (module prefix, weight key, bias key, BN prefix)}`` of the block's convs."""
        return {part: (f"{P}.{m}", f"{P}.{m}.conv.weight", None, f"{P}.{m}.bn") for part, m in (
            ("b1_dw", "branch1.0"), ("b1_pw", "branch1.1"), ("b2_pw1", "branch2.0"), ("b2_dw", "branch2.1"),
            ("b2_pw2", "branch2.2"))}

    def _one(self, w, P, i, lay, hw_in, c2, stride, hidden, hidden_path):
        half = c2 // 2
        reason = f"{self.names[0]} output {P} (chunk + channel shuffle)"
        k = self.keys(P)

        def kw(part):
            _, weight, bias, bn = k[part]
            return {"weight": weight, "bias": bias, "bn": bn}

        if stride == 2:
            if len(lay) > 1:
                w.fix(lay, f"input of {P} (a concat feeding a depthwise conv)")
            hw_b = w.dw(k["b1_dw"][0], i, lay, hw_in, 3, 2, **kw("b1_dw"))
            b1, _ = w.conv(k["b1_pw"][0], i, lay, half, hw_b, **kw("b1_pw"))
            w.fix((b1,), reason)
            inp = lay
        else:
            w.fix(lay, f"input of {P} (split by chunk(2))")
            c_in = w.width(lay)
            inp = (w.new(c_in - c_in // 2, label=f"{P}.chunk", fixed=f"second half of {P}'s input"),)
        h, _ = w.conv(k["b2_pw1"][0], i, inp, hidden, hw_in, path=hidden_path, **kw("b2_pw1"))
        hw = w.dw(k["b2_dw"][0], i, (h,), hw_in, 3, stride, **kw("b2_dw"))
        b2, _ = w.conv(k["b2_pw2"][0], i, (h,), half, hw, **kw("b2_pw2"))
        w.fix((b2,), reason)
        return (w.new(c2, label=f"{P}.out", fixed=reason),), hw


class ConcatRule(BlockRule):
    """Concatenation of several layers along channels."""

    names = ("Concat",)
    module = B.Concat
    pickled = ("models.common.Concat",)

    def parse(self, ctx):
        if not isinstance(ctx.f, list) or len(ctx.f) < 2:
            raise UserError("Concat takes a list of input layers")
        if list(ctx.args or [1]) != [1]:
            raise UserError(f"Concat args {ctx.args!r}: only channel concatenation ([1]) is supported")
        spec = LayerSpec(ctx.i, ctx.f, ctx.n, "Concat", self, {"dimension": (ctx.args or [1])[0]},
                         sum(ctx.ch[x] for x in ctx.f))
        return spec, list(ctx.args), ctx.n

    def build(self, p):
        return B.Concat(p["dimension"])

    def walk_row(self, w, spec, lay, hw):
        return tuple(x for j in spec.f for x in w.layer_out[j]), w.layer_hw[spec.f[0]]


class UpsampleRule(BlockRule):
    """nn.Upsample: ``[size, scale_factor, mode]``; channels pass through."""

    names = ("nn.Upsample", "Upsample")
    module = nn.Upsample

    def parse(self, ctx):
        if ctx.c1 is None:
            raise UserError(f"{ctx.name} takes one input, got from={ctx.f!r}")
        size, sf, mode = (list(ctx.args) + [None, None, "nearest"])[:3]
        if len(ctx.args) > 3:
            raise UserError(f"{ctx.name} takes [size, scale_factor, mode], got {ctx.args!r}")
        if size is None and sf is None:
            sf = 2
        if size is not None and not kernel(size):
            raise UserError(f"{ctx.name} size {size!r}: expected a positive size or an (h, w) pair")
        if sf is not None and (isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 < sf <= 64):
            raise UserError(f"{ctx.name} scale_factor {sf!r}: expected a positive number")
        if mode not in UPSAMPLE_MODES:
            raise UserError(f"{ctx.name} mode {mode!r}: one of {', '.join(UPSAMPLE_MODES)}")
        spec = LayerSpec(ctx.i, ctx.f, ctx.n, "nn.Upsample", self,
                         {"c1": ctx.c1, "size": size, "scale_factor": sf, "mode": mode, "args": list(ctx.args)},
                         ctx.c1)
        return spec, list(ctx.args), ctx.n

    def build(self, p):
        return nn.Upsample(size=p["size"], scale_factor=p["scale_factor"], mode=p["mode"])

    def stride(self, p):
        return 1 / (p["scale_factor"] if p["scale_factor"] is not None else 2)

    def walk_row(self, w, spec, lay, hw_in):
        p = spec.p
        if p["size"] is not None:
            sz = (p["size"], p["size"]) if isinstance(p["size"], int) else tuple(p["size"])
            hw = tuple(int(v) for v in sz)
        else:
            sf = p["scale_factor"]
            sfs = (sf, sf) if not isinstance(sf, (list, tuple)) else tuple(sf)
            hw = tuple(int(x * f) for x, f in zip(hw_in, sfs))
        w.upsample(spec.i, lay, hw, p["mode"] or "nearest")
        return lay, hw


class DetectRule(BlockRule):
    """The YOLOv5 head: one 1x1 conv per level, ``[nc, anchors]``; its outputs are never pruned."""

    names = ("Detect",)
    module = B.Detect
    pickled = ("models.yolo.Detect",)

    def parse(self, ctx):
        if not isinstance(ctx.f, list):
            raise UserError("Detect takes a list of input layers")
        args = ctx.args
        if len(args) < 2:
            raise UserError(f"Detect args are [nc, anchors], got {args!r}")
        if isinstance(args[0], bool) or not isinstance(args[0], int) or args[0] != ctx.nc:
            raise UserError(f"Detect's first arg (its number of classes) is {args[0]!r}: write nc (the YAML's nc is "
                            f"{ctx.nc})")
        anchors = args[1]
        if isinstance(anchors, int):
            anchors = [list(range(anchors * 2))] * len(ctx.f)
        if not isinstance(anchors, list) or len(anchors) != len(ctx.f):
            n_levels = len(anchors) if isinstance(anchors, list) else anchors
            raise UserError(f"Detect has {len(ctx.f)} inputs but {n_levels} anchor levels")
        p = {"nc": args[0], "anchors": anchors, "ch": [ctx.ch[x] for x in ctx.f]}
        return LayerSpec(ctx.i, ctx.f, ctx.n, "Detect", self, p, ctx.no), ["nc", "anchors"], ctx.n

    def build(self, p):
        return B.Detect(p["nc"], p["anchors"], p["ch"])

    def walk_row(self, w, spec, lay, hw):
        for k, j in enumerate(spec.f):
            w.detect_conv(f"model.{spec.i}.m.{k}", spec.i, w.layer_out[j], spec.c_out, w.layer_hw[j])
        return (), hw


# ============================================================================ the lightweight backbones
def even_width(v) -> bool:
    """A positive even width (a Ghost module's two halves)."""
    return pos_int(v) and v % 2 == 0


def relu6_name(v) -> bool:
    """'ReLU6'."""
    return v == "ReLU6"


def drop_rate(v) -> bool:
    """A drop-connect rate in [0, 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def _se_width(p, extra, c, reduction=4):
    """The squeeze width of a block's SeBlock over ``c`` channels (explicit, else ``c // reduction``; None
    without SE)."""
    return int(extra.get("se", c // reduction)) if p.get("use_se") or p.get("has_se") else None


def _residual(p, extra) -> bool:
    """Whether a block adds its input: written in the normal form, else (as the reference decides) stride 1
    and input width == output width."""
    return bool(extra.get("residual", p["s"] == 1 and p["c1"] == p["c2"]))


def _check_residual(p, name):
    if p["residual"] and not (p["s"] == 1 and p["c1"] == p["c2"]):
        raise UserError(f"{name} residual: true needs stride 1 and input width == output width "
                        f"({p['c1']} -> {p['c2']}, stride {p['s']})")


def _with_widths(p, rest, keys, extras=()):
    """The normal form: the args as written, then the explicit inner widths that are set."""
    d = {k: p[k] for k in keys if p.get(k) is not None}
    d.update({k: p[k] for k in extras})
    return [p["c2"], *rest] + ([d] if d else [])


def _ghost(w, P, layer, lay, c2, hw, path, act=True):
    """A GhostConv at ``P``: its primary 1x1 conv makes set G (the YAML writes 2 x G at ``path``), its cheap
    depthwise conv passes G through; the output is the layout (G, G)."""
    g, _ = w.conv(f"{P}.primary_conv", layer, lay, c2 // 2, hw, path=path, scale=2)
    w.dw(f"{P}.cheap_operation", layer, (g,), hw, 3, 1)
    return (g, g)


class GhostConvRule(BlockRule):
    """GhostNet's Ghost module as a layer: ``[c2, k, s, g, act]`` (k, s, g ignored, as the reference)."""

    names = ("GhostConv",)
    module = L.GhostConv
    fields = (("k", 1, kernel), ("s", 1, pos_int), ("g", 1, pos_int), ("act", True, flag))
    pickled = ("models.common.GhostConv",)
    pickled_parts = {"models.common.GhostConv": ("primary_conv", "cheap_operation")}

    def check(self, p, ctx):
        if not even_width(p["c2"]):
            raise UserError(f"GhostConv output width {p['c2']} must be even (two halves)")

    def build(self, p):
        return L.GhostConv(p["c1"], p["c2"], p["k"], p["s"], p["g"], p["act"])

    def walk(self, w, p, prefix, layer, lay, hw):
        return _ghost(w, prefix, layer, lay, p["c2"], hw, w.path(layer, 0)), hw


class GhostBottleneckRule(BlockRule):
    """GhostNet bottleneck: ``[c2, midc, k, s, use_se, {se}]``.

    Both Ghost modules' primary widths are prunable (the YAML's midc and c2 are twice them); the SE
    squeeze width is its own group; the residual add pairs the block's two output halves with the input's
    two halves (another Ghost block's) or with the two halves of the projection shortcut's output.
    """

    names = ("GhostBottleneck",)
    module = L.GhostBottleneck
    fields = (("midc", None, even_width), ("k", 3, kernel), ("s", 1, stride_1_or_2), ("use_se", False, flag))
    widths = ("se",)
    extras = ("residual",)
    pickled = ("models.common.GhostBottleneck", "models.common.SeBlock")
    pickled_parts = {"models.common.GhostBottleneck": ("conv", "shortcut"),
                     "models.common.SeBlock": ("Squeeze", "Excitation")}

    def inner_widths(self, p, extra):
        return {"se": _se_width(p, extra, p["midc"]), "residual": _residual(p, extra)}

    def check(self, p, ctx):
        if not even_width(p["c2"]):
            raise UserError(f"GhostBottleneck output width {p['c2']} must be even (two halves)")
        _check_residual(p, "GhostBottleneck")

    def normal_args(self, p, rest):
        return _with_widths(p, rest, ("se",), ("residual",))

    def stride(self, p):
        return p["s"]

    def build(self, p):
        return L.GhostBottleneck(p["c1"], p["c2"], p["midc"], p["k"], p["s"], p["use_se"], se=p["se"],
                                 residual=p["residual"])

    def walk(self, w, p, prefix, layer, lay, hw_in):
        mid = _ghost(w, f"{prefix}.conv.0", layer, lay, p["midc"], hw_in, w.path(layer, 1))
        hw = w.dw(f"{prefix}.conv.1", layer, mid, hw_in, 3, 2) if p["s"] == 2 else hw_in
        if p["use_se"]:
            w.squeeze_excite(f"{prefix}.conv.2", layer, mid, hw, w.path(layer, -1, "se"), p["se"])
        out = _ghost(w, f"{prefix}.conv.3", layer, mid, p["c2"], hw, w.path(layer, 0))
        if p["residual"]:
            w.residual(lay, out, prefix)
        else:
            w.dw(f"{prefix}.shortcut.0", layer, lay, hw_in, 3, p["s"])
            halves, _ = w.conv(f"{prefix}.shortcut.1", layer, lay, p["c2"], hw, parts=2)
            w.residual(halves, out, prefix)
        return out, hw


class ShuffleNetV2Rule(ShuffleBlockRule):
    """The reference tool's ShuffleNetV2 unit: ``[c2, stride, {hidden: [per repeat]}]`` (its width scaled by
    width_multiple, raw Conv2d/BN layers, biased depthwise convs); channel rules as ShuffleBlock's."""

    names = ("ShuffleNetV2_InvertedResidual",)
    module = L.ShuffleNetV2_InvertedResidual
    scaled = True
    pickled = ("models.common.ShuffleNetV2_InvertedResidual",)
    pickled_parts = {"models.common.ShuffleNetV2_InvertedResidual": ("branch1", "branch2")}

    def check(self, p, ctx):
        super().check(p, ctx)
        if p["stride"] == 1 and p["c1"] != p["c2"]:
            raise UserError(f"ShuffleNetV2_InvertedResidual with stride 1 needs input width == output width "
                            f"({p['c1']} != {p['c2']})")

    def build_row(self, spec):
        p = spec.p
        blocks = [L.ShuffleNetV2_InvertedResidual(p["c1"], p["c2"], p["stride"], hidden=h) for h in p["hidden"]]
        return blocks[0] if spec.n == 1 else nn.Sequential(*blocks)

    def keys(self, P):
        def raw(conv, bn, bias=False):
            return (f"{P}.{conv}", f"{P}.{conv}.weight", f"{P}.{conv}.bias" if bias else None, f"{P}.{bn}")

        return {"b1_dw": raw("branch1.0", "branch1.1", True), "b1_pw": raw("branch1.2", "branch1.3"),
                "b2_pw1": raw("branch2.0", "branch2.1"), "b2_dw": raw("branch2.3", "branch2.4", True),
                "b2_pw2": raw("branch2.5", "branch2.6")}


class ConvBnHswishRule(BlockRule):
    """MobileNetV3's stem: 3x3 conv + BN + Hardswish, ``[c2, stride]``."""

    names = ("conv_bn_hswish",)
    module = L.conv_bn_hswish
    fields = (("stride", None, stride_1_or_2),)
    pickled = ("models.common.conv_bn_hswish",)
    pickled_parts = {"models.common.conv_bn_hswish": ("conv", "bn", "act")}

    def build(self, p):
        return L.conv_bn_hswish(p["c1"], p["c2"], p["stride"])

    def stride(self, p):
        return p["stride"]

    def walk(self, w, p, prefix, layer, lay, hw):
        o, hw = w.conv(prefix, layer, lay, p["c2"], hw, 3, p["stride"], 1, weight=f"{prefix}.conv.weight",
                       path=w.path(layer, 0))
        return (o,), hw


class StemRule(BlockRule):
    """EfficientNet-Lite's stem: 3x3 stride-2 conv + BN + ReLU6, ``[c2, act]``."""

    names = ("stem",)
    module = L.stem
    fields = (("act", "ReLU6", relu6_name),)
    pickled = ("models.common.stem",)
    pickled_parts = {"models.common.stem": ("conv", "bn", "act")}

    def build(self, p):
        return L.stem(p["c1"], p["c2"], p["act"])

    def stride(self, p):
        return 2.0

    def walk(self, w, p, prefix, layer, lay, hw):
        o, hw = w.conv(prefix, layer, lay, p["c2"], hw, 3, 2, 1, weight=f"{prefix}.conv.weight",
                       path=w.path(layer, 0))
        return (o,), hw


def _raw(P, conv, bn):
    """Keys of a raw Conv2d at ``P.conv`` followed by a BatchNorm2d at ``P.bn``."""
    return {"weight": f"{P}.{conv}.weight", "bn": f"{P}.{bn}"}


class MobileNetV3Rule(BlockRule):
    """MobileNetV3 inverted residual: ``[c2, hidden, k, s, use_se, use_hs, {se, expand}]``.

    With expansion the hidden width is its own group; without (hidden == input width) the depthwise conv
    and the SE run on the input's channels, so the YAML's hidden follows the input's group. ``expand``
    (written in the normal form) keeps the structure when pruning makes the two widths equal.
    """

    names = ("MobileNetV3_InvertedResidual",)
    module = L.MobileNetV3_InvertedResidual
    fields = (("hidden", None, pos_int), ("k", 3, odd_kernel), ("s", 1, stride_1_or_2), ("use_se", 0, flag),
              ("use_hs", 0, flag))
    widths = ("se",)
    extras = ("expand", "residual")
    pickled = ("models.common.MobileNetV3_InvertedResidual",)
    pickled_parts = {"models.common.MobileNetV3_InvertedResidual": ("conv",)}

    def inner_widths(self, p, extra):
        return {"se": _se_width(p, extra, p["hidden"]), "expand": bool(extra.get("expand", p["c1"] != p["hidden"])),
                "residual": _residual(p, extra)}

    def check(self, p, ctx):
        if not p["expand"] and p["c1"] != p["hidden"]:
            raise UserError(f"MobileNetV3_InvertedResidual without expansion needs hidden == input width "
                            f"({p['hidden']} != {p['c1']})")
        _check_residual(p, "MobileNetV3_InvertedResidual")

    def normal_args(self, p, rest):
        return _with_widths(p, rest, ("se",), ("expand", "residual"))

    def stride(self, p):
        return p["s"]

    def build(self, p):
        return L.MobileNetV3_InvertedResidual(p["c1"], p["c2"], p["hidden"], p["k"], p["s"], p["use_se"],
                                              p["use_hs"], se=p["se"], expand=p["expand"], residual=p["residual"])

    def walk(self, w, p, prefix, layer, lay, hw):
        P = f"{prefix}.conv"
        if p["expand"]:
            h, _ = w.conv(f"{P}.0", layer, lay, p["hidden"], hw, path=w.path(layer, 1), **_raw(P, 0, 1))
            mid, dw, se, proj = (h,), (3, 4), 5, (7, 8)
        else:
            w.add_path(lay, w.path(layer, 1))  # hidden is the input's width
            mid, dw, se, proj = lay, (0, 1), 3, (4, 5)
        hw = w.dw(f"{P}.{dw[0]}", layer, mid, hw, p["k"], p["s"], **_raw(P, *dw))
        if p["use_se"]:
            w.squeeze_excite(f"{P}.{se}", layer, mid, hw, w.path(layer, -1, "se"), p["se"])
        o, _ = w.conv(f"{P}.{proj[0]}", layer, mid, p["c2"], hw, path=w.path(layer, 0), **_raw(P, *proj))
        if p["residual"]:
            w.residual(lay, (o,), prefix)
        return (o,), hw


class MBConvRule(BlockRule):
    """EfficientNet-Lite MBConv: ``[c2, k, s, expand_ratio, drop_connect_rate, has_se, {expanded, se}]``.

    The expanded width is its own group (without expansion it is the input's); the SE squeeze width its
    own; the projection joins the input's group through the residual add (stride 1, same width).
    """

    names = ("MBConvBlock",)
    module = L.MBConvBlock
    fields = (("k", 3, odd_kernel), ("s", 1, stride_1_or_2), ("expand_ratio", 1, pos_int),
              ("drop_connect_rate", 0, drop_rate), ("has_se", False, flag))
    widths = ("expanded", "se")
    extras = ("residual",)
    pickled = ("models.common.MBConvBlock", "models.common.drop_connect")
    pickled_parts = {"models.common.MBConvBlock": ("_depthwise_conv", "_bn1", "_project_conv", "_bn2", "_relu")}

    def inner_widths(self, p, extra):
        expanded = int(extra.get("expanded", p["c1"] * p["expand_ratio"]))
        return {"expanded": expanded, "se": _se_width(p, extra, expanded), "residual": _residual(p, extra)}

    def check(self, p, ctx):
        if p["expand_ratio"] == 1 and p["expanded"] != p["c1"]:
            raise UserError(f"MBConvBlock without expansion needs expanded == input width ({p['expanded']} != "
                            f"{p['c1']})")
        _check_residual(p, "MBConvBlock")

    def normal_args(self, p, rest):
        return _with_widths(p, rest, ("expanded", "se"), ("residual",))

    def stride(self, p):
        return p["s"]

    def build(self, p):
        return L.MBConvBlock(p["c1"], p["c2"], p["k"], p["s"], p["expand_ratio"], p["drop_connect_rate"],
                             p["has_se"], expanded=p["expanded"], se=p["se"], residual=p["residual"])

    def walk(self, w, p, prefix, layer, lay, hw):
        path = w.path(layer, -1, "expanded")
        if p["expand_ratio"] != 1:
            e, _ = w.conv(f"{prefix}._expand_conv", layer, lay, p["expanded"], hw, path=path,
                          **_raw(prefix, "_expand_conv", "_bn0"))
            mid = (e,)
        else:
            w.add_path(lay, path)
            mid = lay
        hw = w.dw(f"{prefix}._depthwise_conv", layer, mid, hw, p["k"], p["s"],
                  **_raw(prefix, "_depthwise_conv", "_bn1"))
        if p["has_se"]:
            w.squeeze_excite(f"{prefix}.se", layer, mid, hw, w.path(layer, -1, "se"), p["se"])
        o, _ = w.conv(f"{prefix}._project_conv", layer, mid, p["c2"], hw, path=w.path(layer, 0),
                      **_raw(prefix, "_project_conv", "_bn2"))
        if p["residual"]:
            w.residual(lay, (o,), prefix)
        return (o,), hw


class DepthSepConvRule(BlockRule):
    """PP-LCNet block: ``[c2, dw_size, s, use_se, {se}]``; depthwise on the input's channels, SE (squeeze
    input // 16) on them, then a pointwise conv making the output group."""

    names = ("DepthSepConv",)
    module = L.DepthSepConv
    fields = (("dw_size", 3, odd_kernel), ("s", 1, stride_1_or_2), ("use_se", False, flag))
    widths = ("se",)
    pickled = ("models.common.DepthSepConv",)
    pickled_parts = {"models.common.DepthSepConv": ("dw_sp",)}

    def inner_widths(self, p, extra):
        return {"se": _se_width(p, extra, p["c1"], 16)}

    def normal_args(self, p, rest):
        return _with_widths(p, rest, ("se",))

    def stride(self, p):
        return p["s"]

    def build(self, p):
        return L.DepthSepConv(p["c1"], p["c2"], p["dw_size"], p["s"], p["use_se"], se=p["se"])

    def walk(self, w, p, prefix, layer, lay, hw):
        P = f"{prefix}.dw_sp"
        hw = w.dw(f"{P}.0", layer, lay, hw, p["dw_size"], p["s"], **_raw(P, 0, 1))
        if p["use_se"]:
            w.squeeze_excite(f"{P}.3", layer, lay, hw, w.path(layer, -1, "se"), p["se"])
        o, _ = w.conv(f"{P}.4", layer, lay, p["c2"], hw, path=w.path(layer, 0), **_raw(P, 4, 5))
        return (o,), hw


UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")
SILU_CLASSES = {"torch.nn.modules.activation.SiLU", "utils.activations.SiLU"}
CONV_ACT_CLASSES = SILU_CLASSES | {"torch.nn.modules.linear.Identity"}

RULES = (ConvRule(), FocusRule(), ConvMaxpoolRule(), BottleneckRule(), C3Rule(), SPPFRule(), SPPRule(),
         ShuffleBlockRule(), ConcatRule(), UpsampleRule(), DetectRule(),
         GhostConvRule(), GhostBottleneckRule(), ShuffleNetV2Rule(), ConvBnHswishRule(), MobileNetV3Rule(),
         StemRule(), MBConvRule(), DepthSepConvRule())
BY_NAME = {name: r for r in RULES for name in r.names}
BY_PICKLED = {q: r for r in RULES for q in r.pickled}


def rule_for(name: str) -> BlockRule | None:
    """The rule of a YAML module name (None when no block has that name)."""
    return BY_NAME.get(name)
