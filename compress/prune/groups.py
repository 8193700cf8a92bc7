"""Channel groups: the sets of channels that must be pruned together, derived from the normal-form YAML.

Every conv output in a YOLOv5 model is a *channel set*; a residual add (C3 with shortcut, a standalone
Bottleneck with shortcut) merges the sets it adds into one. The merged sets are the groups. Each conv
input is a *layout*: the ordered list of groups that make up its input channels (a Concat lists its
inputs' layouts, SPPF/SPP list cv1's group 4 times, Upsample and max-pools pass their input through).
Pruning a group selects the same channel indices in every tensor whose dim 0 is the group (producer
conv weights, their BN weight/bias/running stats, depthwise convs it passes through) and, at the
matching offsets, in dim 1 of every conv that consumes it (Detect's convs included).

The rule of each block type (:mod:`compress.model.rules`) says what it holds; :mod:`compress.prune.walk`
records it in one pass (with every conv's spatial size). Channels that cannot be pruned safely form groups
with ``prunable=False`` and a ``reason`` (the image, ShuffleBlock outputs, inputs of a ShuffleBlock
chunk, grouped convs, rows repeated with ``number > 1`` that do not repeat inside the block).

Groups depend on the architecture only, so compute them once (``channel_groups(model)``) and reuse them
for any state_dict of that architecture and any number of plans.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from ..errors import UserError
from .walk import ChannelOpRecord, ConvRecord, Walker, hw_of, walk  # noqa: F401  (records re-exported)


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

    ``producers``: state_dict keys whose dim 0 is exactly this group's channels (conv weights and biases,
    BN weight/bias/running_mean/running_var, depthwise convs the channels pass through, a
    squeeze-excitation's expand conv). ``bn_weights``: the BN gammas among them (Network Slimming's
    scores). ``consumers``: conv weights taking the channels on dim 1. ``yaml_paths``: paths into the
    normal-form YAML (e.g. ``("backbone", 2, 3, 3, "cv1")``) whose number is ``size`` times the matching
    entry of ``yaml_scales`` (2 where a Ghost module writes both its halves). ``modules``: the conv modules
    that create the channels (``model.2.cv1``, ``model.2.m.0.cv2``: what ``--exclude`` matches),
    ``layers`` their layer indices. ``prunable`` is False with a ``reason`` for channels that must stay.
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
    bn_weights: tuple = ()
    yaml_scales: tuple = ()


@dataclass
class ChannelGroups:
    """The channel groups of one architecture (see the module docstring).

    ``groups`` lists every group (prunable or not) in model order; ``prunable`` the ones a plan may prune;
    ``by_name`` maps names to groups. ``cfg`` is the normal-form YAML the groups were derived from.
    """

    cfg: dict
    groups: list
    convs: list            # ConvRecord, in model order
    channel_ops: list      # ChannelOpRecord: upsampling, global pooling
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

        key = hw_of(imgsz)
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
            d0 = r.out if r.kind in ("conv", "tied", "dw") else None
            d1 = r.inp if r.kind in ("conv", "tied", "detect") else None
            out[r.weight] = (d0, d1)
            for k in r.dim0_keys:
                out[k] = (d0, None)
        return out


def channel_groups(model_or_cfg) -> ChannelGroups:
    """The channel groups of a built :class:`~compress.model.yolo.Model`, a YAML path or a cfg dict.

    Works from the YAML alone (no tracing); the result is reusable for every state_dict and plan of
    that architecture.
    """
    return _groups_of(walk(getattr(model_or_cfg, "yaml", model_or_cfg), 640))


def resolve_excludes(cg: ChannelGroups, patterns) -> set:
    """Names of the prunable groups matched by ``patterns`` (see :meth:`ChannelGroups.exclude`).

    ``patterns`` may be a string (comma-separated) or a list of strings. Raises UserError for a pattern
    that matches no prunable group.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    raw = [p.strip() for x in (patterns or []) for p in str(x).split(",")]
    if any(not p for p in raw):
        raise UserError(f"--exclude {','.join(map(str, patterns))!r}: an empty pattern (give layer indices, module "
                        f"paths or group names)")
    items = raw
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


def _groups_of(w: Walker) -> ChannelGroups:
    """The channel groups of a walk: its merged channel sets, numbered in model order (records remapped)."""
    roots = sorted({w.find(i) for i in range(len(w.parent))})
    index = {r: k for k, r in enumerate(roots)}

    def remap(layout):
        return tuple(index[w.find(x)] for x in layout)

    for r in w.convs:
        r.out, r.inp = remap(r.out), remap(r.inp)
    for u in w.channel_ops:
        u.layout = remap(u.layout)
    layer_out = [remap(x) for x in w.layer_out]

    producers = {k: [] for k in range(len(roots))}
    gammas = {k: [] for k in range(len(roots))}
    modules = {k: [] for k in range(len(roots))}
    layers = {k: [] for k in range(len(roots))}
    consumers = {k: {} for k in range(len(roots))}
    for r in w.convs:
        if r.kind in ("conv", "tied", "dw", "grouped") and len(r.out) == 1:
            g = r.out[0]
            producers[g] += [r.weight] + r.dim0_keys
            if r.bn:
                gammas[g].append(f"{r.bn}.weight")
            if r.kind in ("conv", "grouped"):
                modules[g].append(r.prefix)
                layers[g].append(r.layer)
        if r.kind in ("conv", "tied", "detect"):
            off = 0
            for g in r.inp:
                consumers[g].setdefault(r.weight, []).append(off)
                off += w.size[roots[g]]
    groups = []
    for k, root in enumerate(roots):
        mods = modules[k]
        name = mods[0] if mods else (w.label[root] or f"set{k}")
        reason = w.fixed.get(root, "")
        if not reason and not w.paths[root]:
            reason = "no YAML width"
        if not reason and not mods:
            reason = "no producer conv"
        groups.append(Group(
            index=k, name=name, size=w.size[root], producers=tuple(producers[k]),
            consumers=tuple(Consumer(key, tuple(offs)) for key, offs in consumers[k].items()),
            yaml_paths=tuple(p for p, _ in w.paths[root]), modules=tuple(mods),
            layers=tuple(sorted(set(layers[k]))), prunable=not reason, reason=reason,
            bn_weights=tuple(gammas[k]), yaml_scales=tuple(f for _, f in w.paths[root]),
        ))
    cg = ChannelGroups(cfg=w.normal, groups=groups, convs=w.convs, channel_ops=w.channel_ops,
                       layer_out=layer_out, layer_types=[s.type for s in w.specs], nb=w.nb)
    cg.slices = cg.layouts()
    return cg
