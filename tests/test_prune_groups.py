"""Channel groups: rules per block, agreement with torch-pruning's DependencyGraph, exclusions."""
import pytest
import torch
import torch.nn as nn

from compress.errors import UserError
from compress.model.yolo import Model
from compress.prune import channel_groups

from conftest import tiny_cfg

# A YAML exercising the blocks the shipped configs do not: Focus, standalone Bottleneck (with and without
# shortcut), SPP, a repeated Conv row, a C3 without shortcut on a concat, a 2-level Detect.
CUSTOM = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "yaml_file": "custom",
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
    "backbone": [
        [-1, 1, "Focus", [16, 3]],              # 0  /2
        [-1, 1, "Conv", [32, 3, 2]],            # 1  /4
        [-1, 1, "Bottleneck", [32]],            # 2  residual with layer 1
        [-1, 1, "Conv", [48, 3, 2]],            # 3  /8
        [-1, 2, "C3", [48]],                    # 4
        [-1, 1, "Conv", [64, 3, 2]],            # 5  /16
        [-1, 2, "Conv", [64, 3, 1]],            # 6  repeated row: fixed
        [-1, 1, "SPP", [64, [3, 5, 7]]],        # 7
    ],
    "head": [
        [-1, 1, "Conv", [32, 1, 1]],            # 8
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],            # 10
        [-1, 1, "C3", [48, False]],             # 11 /8
        [-1, 1, "Conv", [48, 3, 2]],            # 12 /16
        [[-1, 8], 1, "Concat", [1]],            # 13
        [-1, 1, "Bottleneck", [64, False]],     # 14
        [[11, 14], 1, "Detect", ["nc", "anchors"]],
    ],
}


def _get(cfg, path):
    for p in path:
        cfg = cfg[p]
    return cfg


@pytest.mark.parametrize("cfg", [tiny_cfg("yolov5n"), tiny_cfg("yolov5s", width=0.25),
                                 tiny_cfg("shufflenetv2-yolov5"), CUSTOM], ids=["v5n", "v5s", "shufflenet", "custom"])
def test_groups_cover_every_tensor_with_consistent_shapes(cfg):
    m = Model(cfg)
    sd = m.state_dict()
    cg = channel_groups(m)
    # every conv/BN tensor of the model is described, and each described dim has the layout's width
    for k, v in sd.items():
        if v.dim() == 4 or (".bn." in k and not k.endswith("num_batches_tracked")):
            assert k in cg.slices, k
    for k, (d0, d1) in cg.slices.items():
        if d0 is not None:
            assert sd[k].shape[0] == sum(cg.groups[g].size for g in d0), k
        if d1 is not None:
            assert sd[k].shape[1] == sum(cg.groups[g].size for g in d1), k
    for g in cg.groups:
        for key in g.producers:
            assert sd[key].shape[0] == g.size, key
        for c in g.consumers:
            assert all(o + g.size <= sd[c.key].shape[1] for o in c.offsets)
        if g.prunable:  # every prunable width is written in the YAML, with the group's size
            assert g.yaml_paths and g.modules
            assert all(_get(cg.cfg, p) == g.size for p in g.yaml_paths)
    # Detect outputs are never in a group
    det = f"model.{len(cg.layer_out) - 1}.m."
    assert not any(k.startswith(det) for g in cg.groups for k in g.producers)
    # computed from the YAML alone: same groups from the cfg dict as from the built model
    assert [(g.name, g.size, g.prunable) for g in channel_groups(cfg).groups] == \
        [(g.name, g.size, g.prunable) for g in cg.groups]


def test_yolov5_rules():
    cg = channel_groups(tiny_cfg("yolov5n"))
    by = cg.by_name
    # C3 with shortcut: cv1 and every bottleneck cv2 are one residual group, in the YAML at cv1 and m[j][1]
    res = by["model.4.cv1"]
    assert res.modules == ("model.4.cv1", "model.4.m.0.cv2", "model.4.m.1.cv2")
    assert [p[3:] for p in res.yaml_paths] == [(2, "cv1"), (2, "m", 0, 1), (2, "m", 1, 1)]
    assert {c.key for c in res.consumers} == {"model.4.m.0.cv1.conv.weight", "model.4.m.1.cv1.conv.weight",
                                              "model.4.cv3.conv.weight"}
    # C3 without shortcut (head): each bottleneck conv is its own group
    assert "model.13.m.0.cv2" in by and by["model.13.cv1"].modules == ("model.13.cv1",)
    # cv3 takes cat(m(cv1), cv2): cv2's channels at offset = width of the bottleneck output
    assert by["model.4.cv2"].consumers[0].offsets == (res.size,)
    # SPPF: cv1's channels appear 4 times in cv2's input
    (c,) = by["model.9.cv1"].consumers
    s = by["model.9.cv1"].size
    assert c.key == "model.9.cv2.conv.weight" and c.offsets == (0, s, 2 * s, 3 * s) and c.repeat == 4
    # Concat through Upsample: layer 13 takes cat(upsample(10), 6) -> layer 6's group at offset of 10's width
    offs = {c.key: c.offsets for c in by["model.6.cv3"].consumers}
    assert offs["model.13.cv1.conv.weight"] == (by["model.10"].size,)
    # Detect convs consume their producers' channels
    assert any(c.key == "model.24.m.0.weight" for c in by["model.17.cv3"].consumers)
    assert not by["input"].prunable


def test_custom_block_rules():
    cg = channel_groups(CUSTOM)
    by = cg.by_name
    # standalone Bottleneck with shortcut joins its input's group (layer 1) and its own output
    assert by["model.1"].modules == ("model.1", "model.2.cv2") and len(by["model.1"].yaml_paths) == 2
    # without shortcut (input is a concat) it is its own group
    assert by["model.14.cv2"].prunable and by["model.14.cv2"].modules == ("model.14.cv2",)
    # SPP with 3 pools: cv1's channels 4 times
    assert by["model.7.cv1"].consumers[0].repeat == 4
    # a repeated Conv row and its input are fixed (one YAML width for several convs)
    assert not by["model.6.0"].prunable and not by["model.5"].prunable
    assert "repeated" in by["model.6.1"].reason
    assert by["model.0.conv"].prunable  # Focus conv output; its input is the image
    assert cg.slices["model.0.conv.conv.weight"][1] == (0, 0, 0, 0)  # 4 pixel phases of the image


def test_shufflenet_rules():
    cg = channel_groups(tiny_cfg("shufflenetv2-yolov5"))
    by = cg.by_name
    # branch2 hidden width: one group per repeat, pointwise -> depthwise (in = out) -> pointwise
    for name in ["model.1.branch2.0", "model.2.0.branch2.0", "model.2.2.branch2.0", "model.4.6.branch2.0"]:
        g = by[name]
        assert g.prunable
        pre = name[:-2]
        assert f"{pre}.1.conv.weight" in g.producers and f"{pre}.1.bn.running_var" in g.producers
        assert [c.key for c in g.consumers] == [f"{pre}.2.conv.weight"]
        assert g.yaml_paths[0][-2:] == ("hidden", int(name.split(".")[2]) if name.count(".") == 4 else 0)
    # the stem's channels pass through the stride-2 block's depthwise branch1.0
    stem = by["model.0.conv"]
    assert stem.prunable and "model.1.branch1.0.conv.weight" in stem.producers
    assert {c.key for c in stem.consumers} == {"model.1.branch1.1.conv.weight", "model.1.branch2.0.conv.weight"}
    # block outputs are not pruned (chunk + shuffle), and say why
    for g in cg.groups:
        if ".branch1.1" in g.name or ".branch2.2" in g.name or g.name.endswith(".out"):
            assert not g.prunable and "ShuffleBlock output" in g.reason
    assert sum(g.prunable for g in cg.groups) == 1 + 16 + 4 + 4 * 5  # stem, 16 hidden widths, 4 Conv + 4 C3 in the head


def _tp_coupled_sets(model, roots):
    """torch-pruning's coupled (module, in/out, indices) sets for out-channel pruning of each root conv."""
    import torch_pruning as tp

    name_of = {mod: n for n, mod in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 64, 64),
                                               ignored_layers=[model.model[-1]], verbose=False)
    out = {}
    for gname, (conv, size) in roots.items():
        grp = dg.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(size)))
        s = set()
        for dep, idxs in grp:
            mod = dep.target.module
            if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
                kind = "in" if dg.is_in_channel_pruning_fn(dep.handler) and isinstance(mod, nn.Conv2d) else "out"
                s.add((name_of[mod], kind, tuple(sorted(int(i) for i in idxs))))
        out[gname] = s
    return out


def _our_coupled_sets(cg):
    out = {}
    for g in cg.prunable:
        s = {(k.rsplit(".", 1)[0], "out", tuple(range(g.size))) for k in g.producers if k.endswith(".weight")}
        s |= {(c.key.rsplit(".", 1)[0], "in", tuple(sorted(o + i for o in c.offsets for i in range(g.size))))
              for c in g.consumers}
        out[g.name] = s
    return out


@pytest.mark.parametrize("cfg", [tiny_cfg("yolov5n"), tiny_cfg("yolov5s", width=0.25)], ids=["v5n", "v5s"])
def test_groups_match_torch_pruning_dependency_graph(cfg):
    model = Model(cfg).eval()
    cg = channel_groups(model)
    mods = dict(model.named_modules())
    roots = {g.name: (mods[g.modules[0] + ".conv"], g.size) for g in cg.prunable}
    theirs = _tp_coupled_sets(model, roots)
    ours = _our_coupled_sets(cg)
    assert len(ours) == 50
    for name in ours:
        assert ours[name] == theirs[name], name
    # and every non-Detect conv of the model is the root of exactly one of our groups' producers
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("model.24.")}
    produced = [k.rsplit(".", 1)[0] for g in cg.prunable for k in g.producers if k.endswith("conv.weight")]
    assert sorted(produced) == sorted(convs)


def test_exclude_patterns():
    cg = channel_groups(tiny_cfg("yolov5n"))
    assert not cg.exclude("0").by_name["model.0"].prunable
    ex = cg.exclude(["model.0", "model.4.m.1"])  # a bottleneck inside C3 4 -> its residual group and hidden group
    assert {g.name for g in ex.groups if g.reason == "excluded"} == {"model.0", "model.4.cv1", "model.4.m.1.cv1"}
    ex = cg.exclude("9,model.13.cv2")  # comma-separated; a group name
    assert {g.name for g in ex.groups if g.reason == "excluded"} == {"model.9.cv1", "model.9.cv2", "model.13.cv2"}
    assert cg.by_name["model.0"].prunable  # the original is untouched
    assert len(ex.prunable) == len(cg.prunable) - 3
    for bad in ["99", "model.24", "model.2.cv9", "input"]:
        with pytest.raises(UserError, match=f"--exclude {bad}: matches no prunable channel group"):
            cg.exclude(bad)
