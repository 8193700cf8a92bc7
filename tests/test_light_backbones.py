"""The reference tool's lightweight backbones (GhostNet, ShuffleNetV2, MobileNetV3-Small, EfficientNet-Lite0,
PP-LCNet): exact parameter counts of its YAMLs, our shipped configs' headers, channel groups (coverage,
torch-pruning agreement), FLOPs from counts vs thop, pruned == masked, and rounded pruned widths.

The reference YAMLs are read in place from ``../shared/fixtures/reference-yamls`` (never copied into the
project). Pruning checks run on the ``-yolov5s`` configs at 64 px with nc=3 to stay fast on 2 CPU cores.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress.model.profile import profile
from compress.model.yolo import Model, load_cfg, resolve_cfg_path
from compress.prune import (
    apply_plan_to_model, build_pruned, channel_groups, keep_counts_for_ratio, l1_scores,
    plan_counts, plan_from_counts,
)

from conftest import assert_pruned_equals_masked
from test_prune_groups import _get
from test_prune_plan import _model, assert_random_plans_cost_equals_thop, random_plan

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REFERENCE_YAMLS = FIXTURES / "reference-yamls"
needs_fixtures = pytest.mark.skipif(not REFERENCE_YAMLS.is_dir(),
                                    reason=f"reference YAMLs folder {REFERENCE_YAMLS} is absent")

FAMILIES = ["ghostnet", "shufflenetv2", "mobilenetv3s", "efficientlite0", "pplcnet"]
# Reference file of each family and its parameter counts at nc=80 and nc=10 (fixtures README table).
REFERENCE = {
    "ghostnet": ("yolov5lGhost.yaml", 24_672_197, 24_295_247),
    "shufflenetv2": ("yolov5lShffule.yaml", 21_644_789, 21_267_839),
    "mobilenetv3s": ("yolov5lMobilenetv3Small.yaml", 20_752_139, 20_375_189),
    "efficientlite0": ("yolov5lEfficientLite.yaml", 23_393_205, 23_016_255),
    "pplcnet": ("yolov5lPP-LC.yaml", 22_023_373, 21_646_423),
}
SHIPPED = [f"{fam}-yolov5{size}" for fam in FAMILIES for size in "sl"]
HEADER = re.compile(r"^# ([\d,]+) parameters, ([\d.]+) GFLOPs at 640 \(nc=80\)\.$", re.M)
NC = 3  # small Detect heads for the pruning checks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module (restored after it): these models run at 64 px, where two threads on
    two shared cores spin-wait (measured: 85 s for the module under load vs 15 s with one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small(fam: str) -> dict:
    """The family's shipped ``-yolov5s`` config with nc=3 (full widths: the blocks' own widths are tested)."""
    d = load_cfg(f"{fam}-yolov5s.yaml")
    d["nc"] = NC
    return d


def _header(name: str):
    """``(params, gflops)`` stated by a shipped config's header line."""
    m = HEADER.search(resolve_cfg_path(f"{name}.yaml").read_text())
    assert m, f"{name}.yaml has no '# N parameters, G GFLOPs at 640 (nc=80).' line"
    return int(m.group(1).replace(",", "")), float(m.group(2))


def _n_params(model) -> int:
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ exactness
@needs_fixtures
@pytest.mark.parametrize("nc", [80, 10])
@pytest.mark.parametrize("fam", FAMILIES)
def test_reference_yaml_builds_with_reference_param_count(fam, nc):
    file, p80, p10 = REFERENCE[fam]
    # the numbers above are the fixtures README's
    row = re.search(rf"^\| {re.escape(file)} \| ([\d,]+) \| ([\d,]+) \|$", (FIXTURES / "README.md").read_text(), re.M)
    assert row and (int(row.group(1).replace(",", "")), int(row.group(2).replace(",", ""))) == (p80, p10)
    m = Model(str(REFERENCE_YAMLS / file), nc=nc)
    assert _n_params(m) == (p80 if nc == 80 else p10)
    if nc == 80:  # our yolov5l-size config is the reference's rows unrolled: same count
        assert _header(f"{fam}-yolov5l")[0] == p80


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_header_matches_the_model(name):
    params, gflops = _header(name)
    m = Model(f"{name}.yaml")
    assert m.yaml["nc"] == 80 and _n_params(m) == params
    cg = channel_groups(m)
    # thop at 640 takes 2-6 s per model on 2 cores: the header's GFLOPs are checked by the cost model at 640,
    # which equals thop at full width at a small size (and after pruning, see test_cost_model_equals_thop)
    assert round(cg.cost_model(640).gflops(), 2) == gflops
    prof = profile(m, 64)
    assert cg.cost_model(64).gflops() == pytest.approx(prof["gflops"], rel=1e-9)
    assert cg.cost_model(64).params() == prof["params"] == params


# ------------------------------------------------------------------------------------------------ groups
def _positions(cg, layout, g, idx=None):
    """Indices, in a tensor dim laid out as ``layout``, of channels ``idx`` (default all) of group ``g``
    at every place the group occurs (a Ghost module's output holds its group twice)."""
    idx = range(cg.sizes[g]) if idx is None else idx
    out, off = [], 0
    for x in layout:
        if x == g:
            out += [off + i for i in idx]
        off += cg.sizes[x]
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_groups_cover_every_conv_and_bn_consistently(name):
    """test_prune_groups' coverage test, for raw Conv2d/BatchNorm layers and multi-copy layouts."""
    m = Model(f"{name}.yaml", nc=NC)
    sd = m.state_dict()
    cg = channel_groups(m)
    # every parameter and running stat of every conv and BN is described (raw BNs are not named .bn.)
    for mod_name, mod in m.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, leaf, None) is not None:
                    assert f"{mod_name}.{leaf}" in cg.slices, f"{mod_name}.{leaf}"
    # each described dim has the layout's width
    for k, (d0, d1) in cg.slices.items():
        if d0 is not None:
            assert sd[k].shape[0] == sum(cg.sizes[g] for g in d0), k
        if d1 is not None:
            assert sd[k].shape[1] == sum(cg.sizes[g] for g in d1), k
    for g in cg.groups:
        # producers are exactly the group (multi-copy layouts are left to the slices) ...
        for key in g.producers:
            assert cg.slices[key][0] == (g.index,) and sd[key].shape[0] == g.size, key
        # ... and each consumer takes the group at the places its input layout holds it
        for c in g.consumers:
            assert list(c.offsets) == _positions(cg, cg.slices[c.key][1], g.index, [0]), c.key
        if g.prunable:  # every prunable width is written in the YAML (twice the group for Ghost modules)
            assert g.yaml_paths and g.modules
            scales = g.yaml_scales or (1,) * len(g.yaml_paths)
            assert all(_get(cg.cfg, p) == g.size * s for p, s in zip(g.yaml_paths, scales)), g.name
    det = f"model.{len(cg.layer_out) - 1}.m."
    assert not any(k.startswith(det) for g in cg.groups for k in g.producers)
    assert [(g.name, g.size, g.prunable) for g in channel_groups(m.yaml).groups] == \
        [(g.name, g.size, g.prunable) for g in cg.groups]


@pytest.mark.parametrize("fam", FAMILIES)
def test_cost_model_equals_thop(fam):
    m = Model(_small(fam))
    cg = channel_groups(m)
    prof = profile(m, 96)  # full width at another size than test_shipped_config_header_matches_the_model's
    assert cg.cost_model(96).gflops() == pytest.approx(prof["gflops"], rel=1e-9)
    assert cg.cost_model(96).params() == prof["params"]
    assert_random_plans_cost_equals_thop(m, cg)


# ------------------------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("fam", FAMILIES)
def test_pruned_equals_masked(fam):
    """test_prune_plan.test_pruned_equals_masked on each family's blocks (SE, depthwise, Ghost halves,
    ShuffleNet branches)."""
    m = _model(_small(fam))
    cg = channel_groups(m)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        full = m(x)[1][0]
    for seed in range(2):
        plan = random_plan(cg, seed)
        assert len(plan) == len(cg.prunable)  # every prunable group loses channels
        pruned = apply_plan_to_model(m, plan, cg)
        raw_p = assert_pruned_equals_masked(m, pruned, plan, cg, x)
        assert _n_params(pruned) == cg.cost_model(64).params(plan_counts(cg, plan)) < _n_params(m)
        assert (full - raw_p[0]).abs().max() > 1e-3  # masking really matters


@pytest.mark.parametrize("fam", FAMILIES)
def test_pruned_widths_are_multiples_of_round_to(fam):
    """Budgeted plans rounded to 8 and 4: every pruned width a multiple, in the YAML and the tensors. Rounding
    makes a block's input and output widths equal often, so the pruned model is also checked against masking
    (a residual must not appear where the full model has none)."""
    m = _model(_small(fam))
    cg = channel_groups(m)
    x = torch.rand(1, 3, 64, 64)
    sd = m.state_dict()
    scores = l1_scores(cg, sd)
    for round_to, mode in [(8, "uniform"), (4, "global")]:
        counts = keep_counts_for_ratio(cg, 0.5, 64, scores, mode=mode, round_to=round_to)
        cut = {n: k for n, k in counts.items() if k < cg.by_name[n].size}
        assert len(cut) > len(counts) // 2, (round_to, mode)
        for name, k in cut.items():
            assert k % round_to == 0 and k >= round_to, (name, k, round_to)
        plan = plan_from_counts(cg, counts, scores)
        pruned = build_pruned(cg, sd, plan).eval()
        # the built model's groups are the same groups, at the planned widths (YAML and tensors)
        new = channel_groups(pruned)
        assert [g.name for g in new.groups] == [g.name for g in cg.groups]
        assert {g.name: g.size for g in new.prunable} == counts
        psd = pruned.state_dict()
        for name, k in cut.items():
            g = new.by_name[name]
            assert all(psd[key].shape[0] == k for key in g.producers), name
            scales = g.yaml_scales or (1,) * len(g.yaml_paths)
            assert all(_get(new.cfg, p) == k * s for p, s in zip(g.yaml_paths, scales)), name
        assert_pruned_equals_masked(m, pruned, plan, cg, x)


# ------------------------------------------------------------------------------------------------ torch-pruning
def _tp_coupled(dg, model, conv, idx):
    """torch-pruning's coupled ``(module, in/out, indices)`` set for pruning channels ``idx`` of ``conv``'s
    output (as test_prune_groups._tp_coupled_sets, for a subset of the channels, so offsets are checked).

    A depthwise conv's weight has one input channel per group, so pruning "its inputs" (how torch-pruning
    labels a depthwise conv it reaches from its producer) removes its output channels: labelled ``out``, as
    in our groups, where a depthwise conv is a producer of its input's group.
    """
    import torch_pruning as tp

    name_of = {mod: n for n, mod in model.named_modules()}
    out = set()
    for dep, idxs in dg.get_pruning_group(conv, tp.prune_conv_out_channels, list(idx)):
        mod = dep.target.module
        if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
            kind = "in" if dg.is_in_channel_pruning_fn(dep.handler) and isinstance(mod, nn.Conv2d) else "out"
            if isinstance(mod, nn.Conv2d) and 1 < mod.groups == mod.in_channels == mod.out_channels:
                kind = "out"
            out.add((name_of[mod], kind, tuple(sorted(int(i) for i in idxs))))
    return out


def _our_coupled(cg, model, g, idx):
    """Our coupled ``(module, in/out, indices)`` set for channels ``idx`` of group ``g``, from the slices
    (which, unlike ``producers``, also describe tensors holding the group twice: a Ghost module's output)."""
    mods = dict(model.named_modules())
    out = set()
    for key, (d0, d1) in cg.slices.items():
        mod, leaf = key.rsplit(".", 1)
        if leaf != "weight" or not isinstance(mods[mod], (nn.Conv2d, nn.BatchNorm2d)):
            continue
        for kind, layout in (("out", d0), ("in", d1)):
            if layout is not None and g.index in layout:
                out.add((mod, kind, tuple(_positions(cg, layout, g.index, idx))))
    return out


# ShuffleNetV2 is not compared: torch-pruning 1.6 cannot trace its channel split + shuffle (build_dependency
# raises ZeroDivisionError in update_reshape_index_mapping on channel_shuffle's view/transpose/view).
@pytest.mark.parametrize("fam,n_prunable", [("ghostnet", 55), ("mobilenetv3s", 51), ("efficientlite0", 50),
                                            ("pplcnet", 42)])
def test_groups_match_torch_pruning_dependency_graph(fam, n_prunable):
    """Every prunable group, pruned at three of its channels from its first conv, couples the same convs and
    BNs at the same indices in torch-pruning's DependencyGraph as in our groups. That includes the
    squeeze-excitation expand convs (``tied``: torch-pruning couples their outputs with the SE input through
    ``x * s.expand_as(x)``), Ghost halves (concat of a conv and its depthwise conv) and projection shortcuts."""
    import torch_pruning as tp

    model = Model(_small(fam)).eval()
    cg = channel_groups(model)
    assert len(cg.prunable) == n_prunable
    mods = dict(model.named_modules())
    record = {r.prefix: r for r in cg.convs}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 64, 64),
                                               ignored_layers=[model.model[-1]], verbose=False)
    for g in cg.prunable:
        conv = mods[record[g.modules[0]].weight.rsplit(".", 1)[0]]
        idx = sorted({0, g.size // 3, g.size - 1})
        assert _our_coupled(cg, model, g, idx) == _tp_coupled(dg, model, conv, idx), g.name
    # the only fixed channels besides the image: GhostNet's first bottleneck adds the stem conv's single set to
    # its output's two Ghost halves (a layout mismatch), so both are kept whole
    fixed = sorted(r.prefix for r in cg.convs if r.kind != "detect" and any(not cg.groups[x].prunable for x in r.out))
    assert fixed == (["model.0", "model.1.conv.3.cheap_operation", "model.1.conv.3.primary_conv",
                      "model.2.shortcut.0"] if fam == "ghostnet" else [])
