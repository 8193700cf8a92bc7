"""``compress prune``: artifact, report, table and chart; one-line errors for bad input."""
import json

import pytest
import torch
import yaml

from compress.cli import main
from compress.model.artifact import load_model, save_model
from compress.model.profile import profile
from compress.model.yolo import Model

from conftest import tiny_cfg


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    d = tiny_cfg("yolov5n", width=0.25)
    d.pop("yaml_file")
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture
def artifact(tmp_path, cfg_file):
    torch.manual_seed(0)
    m = Model(str(cfg_file))
    for mod in m.modules():  # distinct BN gammas so the bn criterion has something to rank
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.1, 1.0)
    return save_model(m, tmp_path / "art", report={"stage": "test"})


def test_prune_cfg_writes_artifact_and_report(tmp_path, cfg_file, capsys):
    out = tmp_path / "p"
    rc = main(["prune", "--cfg", str(cfg_file), "--ratio", "0.4", "--imgsz", "64", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "GFLOPs before" in text and "C3" in text and "SPPF" in text
    assert "asked to remove 40.0%" in text and f"wrote {out}" in text
    for f in ("model.yaml", "weights.pt", "report.json", "channels.png"):
        assert (out / f).is_file(), f
    assert (out / "channels.png").read_bytes()[:4] == b"\x89PNG"
    rep = json.loads((out / "report.json").read_text())
    pruned = load_model(out)
    prof = profile(pruned, 64)
    assert rep["stage"] == "prune" and rep["options"]["ratio"] == 0.4 and rep["options"]["method"] == "l1"
    assert rep["params"] == prof["params"] < rep["params_before"]
    assert rep["gflops"] == pytest.approx(prof["gflops"], rel=1e-9)
    assert rep["gflops_before"] == pytest.approx(profile(Model(str(cfg_file)), 64)["gflops"], rel=1e-9)
    assert rep["flops_ratio"] <= 0.6 and rep["flops_ratio"] == pytest.approx(rep["gflops"] / rep["gflops_before"])
    kept = {k: v["kept"] for k, v in rep["groups"].items()}
    assert kept["model.4.cv1"] == pruned.model[4].cv1.conv.out_channels
    assert all(v["kept"] == v["size"] or v["kept"] % 8 == 0 for v in rep["groups"].values())
    assert len(rep["layers"]) == 25 and rep["layers"][24]["module"] == "Detect"


def test_prune_weights_bn_global_exclude(tmp_path, artifact, capsys):
    out = tmp_path / "p"
    rc = main(["prune", "--weights", str(artifact), "--ratio", "0.5", "--method", "bn", "--global",
               "--exclude", "0", "model.9", "--round-to", "4", "--imgsz", "64", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["groups"]["model.0"] == {"kept": 16, "size": 16, "layers": [0], "not_pruned": "excluded"}
    assert rep["groups"]["model.9.cv1"]["not_pruned"] == "excluded"
    assert all(v["kept"] % 4 == 0 for v in rep["groups"].values())
    assert rep["flops_ratio"] <= 0.5
    # the kept channels of a group are its largest BN gammas (summed over the group's BNs)
    src = load_model(artifact).state_dict()
    gamma = src["model.10.bn.weight"].abs()
    k = rep["groups"]["model.10"]["kept"]
    assert k < gamma.numel()
    pruned = load_model(out).state_dict()
    want = gamma.sort(descending=True).values[:k].sort().values
    assert torch.equal(pruned["model.10.bn.weight"].abs().sort().values, want)


@pytest.mark.parametrize("args,msg", [
    (["--ratio", "0"], "--ratio 0.0: must be in (0, 1)"),
    (["--ratio", "1.5"], "--ratio 1.5: must be in (0, 1)"),
    (["--ratio", "0.5", "--round-to", "0"], "--round-to 0: must be a positive integer"),
    (["--ratio", "0.5", "--exclude", "99"], "--exclude 99: matches no prunable channel group"),
    (["--ratio", "0.99"], "cannot remove that much"),
    (["--ratio", "0.5", "--imgsz", "50"], "--imgsz 50 must be a positive multiple"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, cfg_file, capsys, args, msg):
    rc = main(["prune", "--cfg", str(cfg_file), "--imgsz", "64", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("compress prune: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_missing_model_is_a_user_error(tmp_path, capsys):
    assert main(["prune", "--ratio", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "give --weights" in capsys.readouterr().err
    assert main(["prune", "--weights", str(tmp_path / "nope.pt"), "--ratio", "0.5"]) == 2
    assert "nope.pt" in capsys.readouterr().err
