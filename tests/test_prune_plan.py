"""Channel plans: exactness against masking, FLOPs from counts vs thop, rounding, budgets, artifacts."""
import copy

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.export import export_onnx, onnx_parity
from compress.model.artifact import load_model, save_model
from compress.model.profile import profile
from compress.model.yolo import Model
from compress.prune import (
    apply_plan, apply_plan_to_model, bn_scores, channel_groups, keep_counts_for_ratio, l1_scores,
    plan_counts, plan_from_counts, round_keep, validate_plan,
)

from conftest import assert_pruned_equals_masked, tiny_cfg
from test_prune_groups import CUSTOM

CFGS = {"v5n": tiny_cfg("yolov5n"), "v5s": tiny_cfg("yolov5s", width=0.25),
        "shufflenet": tiny_cfg("shufflenetv2-yolov5"), "custom": CUSTOM}


def _model(cfg, seed=0):
    """A model in eval mode with non-trivial BN parameters and statistics."""
    torch.manual_seed(seed)
    m = Model(cfg).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
    return m


def random_plan(cg, seed):
    """Prune every prunable group to a random number (>= 1) of random channels."""
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for grp in cg.prunable:
        k = int(torch.randint(1, grp.size, (1,), generator=g)) if grp.size > 1 else 1
        plan[grp.name] = torch.randperm(grp.size, generator=g)[:k]
    return plan


def assert_random_plans_cost_equals_thop(m, cg, imgsz=64, seeds=2):
    """For ``seeds`` random plans, the cost model's GFLOPs and params from channel counts (whole model and per
    layer) equal thop's on the pruned model built from the plan's YAML."""
    cm = cg.cost_model(imgsz)
    for seed in range(seeds):
        plan = random_plan(cg, seed)
        cfg, _ = apply_plan(cg, m.state_dict(), plan)
        prof = profile(Model(cfg), imgsz, per_layer=True)
        counts = plan_counts(cg, plan)
        assert cm.gflops(counts) == pytest.approx(prof["gflops"], rel=1e-9)
        assert cm.params(counts) == prof["params"]
        per = cm.per_layer(counts)
        np.testing.assert_allclose(per["gflops"], [r["gflops"] for r in prof["layers"]], rtol=1e-9, atol=1e-15)
        assert per["params"].tolist() == [r["params"] for r in prof["layers"]]


@pytest.mark.parametrize("name", list(CFGS))
def test_pruned_equals_masked(name):
    m = _model(CFGS[name])
    cg = channel_groups(m)
    x = torch.rand(1, 3, 64, 64)
    for seed in range(1 if name == "shufflenet" else 2):
        plan = random_plan(cg, seed)
        if name == "v5n":  # residual groups and concat inputs are among the pruned ones
            assert {"model.4.cv1", "model.6.cv3", "model.10", "model.9.cv1"} <= set(plan)
        pruned = apply_plan_to_model(m, plan, cg)
        assert not pruned.training
        assert_pruned_equals_masked(m, pruned, plan, cg, x)
        # the pruned model is physically smaller, by the exact count from channel counts alone
        cm = cg.cost_model(64)
        assert sum(p.numel() for p in pruned.parameters()) == cm.params(plan_counts(cg, plan)) < cm.params()
    # masking really matters: the unmasked model differs
    with torch.no_grad():
        assert (m(x)[1][0] - pruned(x)[1][0]).abs().max() > 1e-3


def _thop_gflops(model, imgsz):
    """2 x thop MACs with a 3-channel image (compress.model.profile guesses the input width from the first
    conv, which is 4x too wide for a Focus stem)."""
    import thop

    macs, _ = thop.profile(copy.deepcopy(model).eval(), inputs=(torch.zeros(1, 3, imgsz, imgsz),), verbose=False)
    return 2 * macs / 1e9


def test_custom_blocks_flops_equal_thop():
    m = Model(CUSTOM)
    cg = channel_groups(m)
    cm = cg.cost_model(64)
    assert cm.gflops() == pytest.approx(_thop_gflops(m, 64), rel=1e-9)
    plan = random_plan(cg, 0)
    pruned = apply_plan_to_model(m, plan, cg)
    assert cm.gflops(plan_counts(cg, plan)) == pytest.approx(_thop_gflops(pruned, 64), rel=1e-9)


@pytest.mark.parametrize("name", ["v5n", "v5s", "shufflenet"])
def test_plan_flops_and_params_equal_thop(name):
    m = Model(CFGS[name])
    cg = channel_groups(m)
    for imgsz in (64, 96) if name != "shufflenet" else (64,):
        cm = cg.cost_model(imgsz)
        prof = profile(m, imgsz)
        assert cm.gflops() == pytest.approx(prof["gflops"], rel=1e-9)
        assert cm.params() == prof["params"]
    assert_random_plans_cost_equals_thop(m, cg)


def test_apply_is_index_selection_on_the_state_dict():
    m = _model(CFGS["v5n"])
    cg = channel_groups(m)
    sd = m.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    plan = {"model.9.cv1": torch.tensor([5, 1, 60]), "model.10": torch.arange(0, 64, 2)}
    cfg, new = apply_plan(cg, sd, plan)
    assert all(torch.equal(before[k], sd[k]) for k in sd)  # input untouched
    assert torch.equal(new["model.9.cv1.conv.weight"], sd["model.9.cv1.conv.weight"][[1, 5, 60]])
    assert torch.equal(new["model.9.cv1.bn.running_var"], sd["model.9.cv1.bn.running_var"][[1, 5, 60]])
    # SPPF cv2 takes the 3 kept channels at each of the 4 copies
    idx = [c + o for o in (0, 64, 128, 192) for c in (1, 5, 60)]
    assert torch.equal(new["model.9.cv2.conv.weight"], sd["model.9.cv2.conv.weight"][:, idx])
    # layer 10 feeds layer 13 (offset 0 in cat(upsample(10), 6)) and layer 23 (offset 64 in cat(21, 10))
    assert torch.equal(new["model.13.cv1.conv.weight"],
                       sd["model.13.cv1.conv.weight"][:, list(range(0, 64, 2)) + list(range(64, 128))])
    assert torch.equal(new["model.23.cv2.conv.weight"],
                       sd["model.23.cv2.conv.weight"][:, list(range(64)) + list(range(64, 128, 2))])
    assert new["model.0.conv.weight"] is sd["model.0.conv.weight"]  # untouched tensors are shared
    rows = cfg["backbone"]
    assert rows[9][3][-1]["cv1"] == 3 and cfg["head"][0][3][0] == 32
    assert cg.cfg["backbone"][9][3][-1]["cv1"] == 64  # the groups' YAML is not modified
    # one ChannelGroups serves any state_dict of the architecture
    other = _model(CFGS["v5n"], seed=1).state_dict()
    _, new2 = apply_plan(cg, other, plan)
    assert torch.equal(new2["model.9.cv1.conv.weight"], other["model.9.cv1.conv.weight"][[1, 5, 60]])


def test_pruned_artifact_reloads_trains_and_exports(tmp_path):
    m = _model(CFGS["v5s"])
    cg = channel_groups(m)
    pruned = apply_plan_to_model(m, random_plan(cg, 3), cg)
    save_model(pruned, tmp_path / "p", report={"stage": "prune"})
    again = load_model(tmp_path / "p").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(pruned(x)[0], again(x)[0])
    # the artifact is itself prunable again (normal-form YAML with other numbers)
    cg2 = channel_groups(again)
    assert cg2.cost_model(64).params() == sum(p.numel() for p in again.parameters())
    # one training step
    again.train()
    out = again(torch.rand(2, 3, 64, 64))
    loss = sum(o.float().pow(2).mean() for o in out)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in again.parameters())
    # ONNX (TorchScript exporter) agrees with onnxruntime (decoded boxes are in pixels: relative check)
    with torch.no_grad():
        scale = pruned.eval()(torch.rand(1, 3, 64, 64))[0].abs().max().item()
    onnx_path = export_onnx(pruned, tmp_path / "p.onnx", 64)
    assert onnx_parity(pruned, onnx_path, 64) < 1e-6 * scale


def test_round_keep_rule():
    assert round_keep(12.0, 64) == 16 and round_keep(11.9, 64) == 8  # nearest multiple, not down
    assert round_keep(3, 64) == 8 and round_keep(0, 64) == 8           # at least round_to, never 0
    assert round_keep(0, 5) == 5 and round_keep(2, 5) == 5             # small groups stay whole
    assert round_keep(19, 20) == 16 and round_keep(20, 20) == 20       # unpruned width kept as is
    assert round_keep(99, 116) == 96 and round_keep(100, 116) == 104   # halves round up
    assert round_keep(115, 116) == 112 and round_keep(117, 120) == 120  # 120 reaches the width: whole
    assert round_keep(13, 64, round_to=4) == 12
    with pytest.raises(UserError, match="round-to"):
        round_keep(3, 64, round_to=0)


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_keep_counts_meet_the_budget(mode):
    # counts only: full-size yolov5s at 640 without building weights for the FLOPs side
    m = Model("yolov5s.yaml")
    cg = channel_groups(m).exclude("0")
    scores = l1_scores(cg, m.state_dict())
    cm = cg.cost_model(640)
    for keep in (0.3, 0.5, 0.8):
        counts = keep_counts_for_ratio(cg, keep, 640, scores, mode=mode)
        assert set(counts) == {g.name for g in cg.prunable}
        got = cm.macs(counts) / cm.macs()
        assert keep - 0.03 < got <= keep  # meets the budget, and closely
        for g in cg.prunable:
            k = counts[g.name]
            assert k == g.size or (k % 8 == 0 and 8 <= k < g.size)
        if mode == "uniform":
            ratios = [counts[g.name] / g.size for g in cg.prunable]
            assert max(ratios) - min(ratios) < 0.25  # same channel ratio up to rounding to 8
    counts = keep_counts_for_ratio(cg, 0.5, 640, scores, mode=mode, round_to=16)
    assert all(c % 16 == 0 for c in counts.values())
    with pytest.raises(UserError, match="cannot remove that much"):
        keep_counts_for_ratio(cg, 0.01, 640, scores, mode=mode)
    with pytest.raises(UserError, match=r"in \(0, 1\]"):
        keep_counts_for_ratio(cg, 1.5, 640, scores, mode=mode)


def test_global_ranking_prunes_the_unimportant_group():
    cg = channel_groups(tiny_cfg("yolov5n", width=0.25))
    scores = {g.name: torch.ones(g.size) for g in cg.prunable}
    scores["model.7"] = torch.linspace(0.01, 0.02, cg.by_name["model.7"].size)  # far below the rest
    counts = keep_counts_for_ratio(cg, 0.95, 64, scores, mode="global", normalize=None)
    assert counts["model.7"] < cg.by_name["model.7"].size
    assert sum(counts[g] < cg.by_name[g].size for g in counts) == 1
    plan = plan_from_counts(cg, counts, scores)
    assert plan["model.7"].tolist() == list(range(cg.by_name["model.7"].size - counts["model.7"],
                                                  cg.by_name["model.7"].size))  # the highest scores


def test_importance_scores():
    m = _model(CFGS["v5n"])
    cg = channel_groups(m)
    sd = m.state_dict()
    l1, bn = l1_scores(cg, sd), bn_scores(cg, sd)
    res = cg.by_name["model.2.cv1"]  # residual group: cv1 + m.0.cv2
    want = sum(sd[f"model.2.{c}.conv.weight"].abs().sum((1, 2, 3)) for c in ("cv1", "m.0.cv2"))
    torch.testing.assert_close(l1[res.name], want)
    torch.testing.assert_close(bn[res.name], sd["model.2.cv1.bn.weight"].abs() + sd["model.2.m.0.cv2.bn.weight"].abs())
    assert set(l1) == set(bn) == {g.name for g in cg.prunable}


def test_bad_plans_are_user_errors():
    cg = channel_groups(tiny_cfg("yolov5n")).exclude("0")
    sd = Model(tiny_cfg("yolov5n")).state_dict()
    for plan, msg in [
        ({"model.1": []}, "keeps no channels of group model.1"),
        ({"model.1": [0, 99]}, "of group model.1, which has 16 channels"),
        ({"model.1": [1, 1]}, "twice"),
        ({"model.99": [0]}, "unknown channel group 'model.99'"),
        ({"model.0": [0]}, "not prunable (excluded)"),
        ({"input": [0]}, "not prunable (image input)"),
    ]:
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            apply_plan(cg, sd, plan)
    with pytest.raises(UserError, match="keeps 0 channels"):
        plan_from_counts(cg, {"model.1": 0})
    assert validate_plan(cg, {"model.1": list(range(16))}) == {}  # a whole group is no pruning
