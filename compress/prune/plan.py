"""Channel plans: which channel indices each group keeps, and applying a plan.

A *plan* is a dict ``{group name: 1-D LongTensor of kept channel indices}``; a group it does not name
keeps all its channels. Applying a plan is pure tensor indexing: ``index_select`` on every member
tensor of the state_dict (dim 0 for producers, dim 1 at the right offsets for consumers) and an edit of
the normal-form YAML; the model is then built from that YAML and the sliced weights are loaded. Nothing
is traced or deep-copied per plan.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..errors import UserError
from ..model.yolo import Model


def round_keep(n, size: int, round_to: int = 8) -> int:
    """Round a raw keep count ``n`` of a ``size``-channel group to the nearest multiple of ``round_to``.

    The result lies in ``[min(round_to, size), size]`` (never 0); a count that reaches ``size`` means
    the group is left whole, so an unpruned width that is not a multiple of ``round_to`` stays as is.
    """
    if round_to < 1:
        raise UserError(f"--round-to must be a positive integer, got {round_to}")
    if n >= size:
        return int(size)
    r = int(math.floor(n / round_to + 0.5)) * round_to
    return int(max(min(r, size), min(round_to, size)))


def round_keep_array(n, sizes, round_to: int = 8) -> np.ndarray:
    """Vectorised :func:`round_keep` over numpy arrays of raw counts and group sizes."""
    if round_to < 1:
        raise UserError(f"--round-to must be a positive integer, got {round_to}")
    n, sizes = np.asarray(n, dtype=np.float64), np.asarray(sizes, dtype=np.int64)
    r = np.floor(n / round_to + 0.5).astype(np.int64) * round_to
    r = np.clip(r, np.minimum(round_to, sizes), sizes)
    return np.where(n >= sizes, sizes, r)


def plan_from_counts(cg, counts: dict, scores: dict | None = None) -> dict:
    """The plan keeping, in each group, its ``counts[name]`` highest-scoring channels.

    ``scores`` maps group names to per-channel importance (higher = keep); without it the first
    channels are kept. Ties keep the lower index. Groups kept whole are left out of the plan.
    """
    by_name = cg.by_name
    plan = {}
    for name, k in counts.items():
        g = _group(by_name, name)
        k = int(k)
        if k >= g.size:
            continue
        if k < 1:
            raise UserError(f"plan keeps {k} channels of group {name} (every group keeps at least one)")
        if scores is None or name not in scores:
            idx = torch.arange(k)
        else:
            s = torch.as_tensor(scores[name], dtype=torch.float64).flatten()
            if s.numel() != g.size:
                raise ValueError(f"scores of {name} have {s.numel()} entries, the group has {g.size}")
            idx = torch.argsort(-s, stable=True)[:k].sort().values
        plan[name] = idx
    return plan


def plan_counts(cg, plan: dict) -> dict:
    """``{group name: kept count}`` for every prunable group (full size where the plan leaves it whole)."""
    out = {g.name: g.size for g in cg.prunable}
    for name, idx in plan.items():
        out[name] = len(idx)
    return out


def validate_plan(cg, plan: dict) -> dict:
    """Check a plan against the groups and return it normalised (sorted unique LongTensors).

    Raises UserError for an unknown or non-prunable group, an index out of range or repeated, or a
    group left with no channels.
    """
    by_name = cg.by_name
    out = {}
    for name, idx in plan.items():
        g = _group(by_name, name)
        if not g.prunable:
            raise UserError(f"plan prunes group {name}, which is not prunable ({g.reason})")
        t = torch.as_tensor(idx, dtype=torch.long).flatten().cpu()
        if t.numel() == 0:
            raise UserError(f"plan keeps no channels of group {name} (every group keeps at least one)")
        t = t.sort().values
        if int(t[0]) < 0 or int(t[-1]) >= g.size:
            raise UserError(f"plan keeps channel {int(t[-1]) if int(t[-1]) >= g.size else int(t[0])} "
                            f"of group {name}, which has {g.size} channels")
        if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
            raise UserError(f"plan lists a channel of group {name} twice")
        if t.numel() < g.size:
            out[name] = t
    return out


def apply_plan(cg, state_dict: dict, plan: dict):
    """Prune a state_dict and the normal-form YAML by a plan.

    Returns ``(cfg, state_dict)``: the pruned normal-form YAML (a dict; build it with
    :class:`~compress.model.yolo.Model`) and a new state_dict whose member tensors are index-selected
    (the others are shared with the input, not copied).
    """
    keep = validate_plan(cg, plan)
    by_name = cg.by_name
    idx = {by_name[n].index: t for n, t in keep.items()}
    sizes = cg.sizes
    cache = {}

    def layout_index(layout, device):
        if layout is None or not any(g in idx for g in layout):
            return None
        if layout not in cache:
            parts, off = [], 0
            for g in layout:
                parts.append(idx[g] + off if g in idx else torch.arange(off, off + sizes[g]))
                off += sizes[g]
            cache[layout] = torch.cat(parts)
        return cache[layout].to(device)

    sd = dict(state_dict)
    for key, (d0, d1) in cg.slices.items():
        t = state_dict[key]
        i0, i1 = layout_index(d0, t.device), layout_index(d1, t.device)
        if i0 is not None:
            t = t.index_select(0, i0)
        if i1 is not None:
            t = t.index_select(1, i1)
        sd[key] = t
    cfg = copy.deepcopy(cg.cfg)
    for name, t in keep.items():
        g = by_name[name]
        for path, scale in zip(g.yaml_paths, g.yaml_scales or (1,) * len(g.yaml_paths)):
            node = cfg
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = int(t.numel()) * scale
    return cfg, sd


def build_pruned(cg, state_dict: dict, plan: dict, names=None) -> Model:
    """Apply a plan (:func:`apply_plan`), build the pruned model from its YAML and load the weights.

    The new model is on the device of ``state_dict`` and in train mode (as a freshly built Model).
    """
    cfg, sd = apply_plan(cg, state_dict, plan)
    model = Model(cfg, names=names)
    dev = next(iter(sd.values())).device
    model.to(dev).load_state_dict(sd, strict=True)
    return model


def apply_plan_to_model(model, plan: dict, groups=None) -> Model:
    """Convenience: the pruned copy of ``model`` (same names, device and train/eval mode).

    Pass ``groups`` (from :func:`~compress.prune.groups.channel_groups`) when applying many plans to
    one architecture, so they are not recomputed each time.
    """
    from .groups import channel_groups

    cg = groups if groups is not None else channel_groups(model)
    new = build_pruned(cg, model.state_dict(), plan, names=getattr(model, "names", None))
    return new.train(model.training)


@torch.no_grad()
def mask_dropped_channels_(model, plan: dict, groups) -> None:
    """Zero every channel a plan drops at the conv that creates it, in place (the model keeps its shape):
    its BN gamma and beta, or (a conv without BN, e.g. a squeeze-excitation's squeeze) its weights and bias.

    Dropped channels then carry zeros through every activation used here (SiLU, ReLU, ReLU6, Hardswish
    of 0 are 0), so the masked model computes what the pruned model computes: the reference for
    exactness tests.
    """
    keep = validate_plan(groups, plan)
    params = dict(model.named_parameters())
    for name, t in keep.items():
        g = groups.by_name[name]
        drop = torch.ones(g.size, dtype=torch.bool)
        drop[t] = False
        sizes = groups.sizes
        for r in groups.convs:  # every conv whose output holds the group: zero its BN, or the conv itself
            if r.kind in ("tied", "detect") or g.index not in r.out:
                continue
            keys = [f"{r.bn}.weight", f"{r.bn}.bias"] if r.bn else [r.weight] + ([r.bias] if r.bias else [])
            off = 0
            for x in r.out:
                if x == g.index:
                    rows = torch.nonzero(drop).flatten() + off
                    for key in keys:
                        params[key][rows.to(params[key].device)] = 0
                off += sizes[x]


def _group(by_name, name):
    g = by_name.get(name)
    if g is None:
        raise UserError(f"plan names unknown channel group '{name}'")
    return g

