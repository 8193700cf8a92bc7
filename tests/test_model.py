"""Model building from YAML: parameter counts, normal form, forward shapes, bad YAML."""
import pytest
import torch

from compress.errors import UserError
from compress.model.artifact import load_model, save_model
from compress.model.yolo import Model, parse_cfg

from conftest import tiny_cfg


@pytest.mark.parametrize("name,params", [
    ("yolov5n", 1_872_157), ("yolov5s", 7_235_389), ("yolov5m", 21_190_557),
    ("yolov5l", 46_563_709), ("yolov5x", 86_749_405),
])
def test_param_counts_match_ultralytics(name, params):
    m = Model(f"{name}.yaml")
    assert sum(p.numel() for p in m.parameters()) == params


def test_state_dict_keys_are_ultralytics_names():
    sd = Model("yolov5n.yaml").state_dict()
    for k in ["model.0.conv.weight", "model.2.m.0.cv1.bn.running_var", "model.24.m.0.bias",
              "model.24.anchors", "model.9.cv2.bn.weight", "model.8.cv3.conv.weight"]:
        assert k in sd, k
    assert sd["model.24.anchors"].shape == (3, 3, 2)
    assert torch.allclose(sd["model.24.anchors"][0, 0], torch.tensor([10 / 8, 13 / 8]))


def test_train_and_eval_outputs():
    m = Model(tiny_cfg())
    x = torch.rand(2, 3, 128, 96)
    m.train()
    raw = m(x)
    assert [t.shape for t in raw] == [(2, 3, 16, 12, 9), (2, 3, 8, 6, 9), (2, 3, 4, 3, 9)]
    m.eval()
    dec, raw2 = m(x)
    assert dec.shape == (2, 3 * (16 * 12 + 8 * 6 + 4 * 3), 9)
    # decoded xy are pixel centres inside (a margin around) the image
    assert dec[..., 0].max() < 96 + 32 and dec[..., 1].max() < 128 + 32


@pytest.mark.parametrize("name", ["yolov5n", "shufflenetv2-yolov5"])
def test_normal_form_rebuild_is_bit_identical(name, tmp_path):
    torch.manual_seed(0)
    m = Model(tiny_cfg(name)).eval()
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
    save_model(m, tmp_path / "a")
    m2 = load_model(tmp_path / "a").eval()
    assert m2.yaml == m.yaml
    assert m2.yaml["explicit_channels"] is True
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(m(x)[0], m2(x)[0])
    # the normal form of a normal form is itself
    _, again = parse_cfg(m.yaml)
    assert again == m.yaml


def test_explicit_c3_widths_are_expressible():
    d = tiny_cfg()
    _, normal = parse_cfg(d)
    row = normal["backbone"][2]
    assert row[2] == "C3" and isinstance(row[3][-1], dict)
    row[3][-1]["cv2"] = 8
    row[3][-1]["m"] = [[8, row[3][-1]["cv1"]]]
    m = Model(normal)
    assert m.model[2].cv2.conv.out_channels == 8
    assert m.model[2].m[0].cv1.conv.out_channels == 8
    assert m.model[2].cv3.conv.in_channels == row[3][-1]["cv1"] + 8


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d["backbone"].__setitem__(1, [-1, 1, "Conv9", [16, 3, 2]]), "unknown module 'Conv9'"),
    (lambda d: d["head"].__setitem__(2, [[-1, 30], 1, "Concat", [1]]), "bad 'from' index 30"),
    (lambda d: d.pop("anchors"), "missing key 'anchors'"),
    (lambda d: d["backbone"].__setitem__(0, [-1, 1, "Conv"]), "expected [from, number, module, args]"),
])
def test_bad_yaml_is_a_clear_user_error(mutate, msg):
    d = tiny_cfg()
    mutate(d)
    with pytest.raises(UserError) as e:
        Model(d)
    assert msg in str(e.value) and "tiny-yolov5n" in str(e.value)


def test_shufflenet_structure():
    m = Model("shufflenetv2-yolov5.yaml")
    assert type(m.model[0]).__name__ == "Conv_maxpool"
    assert m.model[0].conv.conv.out_channels == 24
    assert m.model[1].branch1[0].conv.groups == 116 // 116 * 24  # depthwise on the input
    assert len(m.model[4]) == 7
    assert torch.equal(m.stride, torch.tensor([8.0, 16.0, 32.0]))
