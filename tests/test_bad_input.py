"""Bad inputs found by trying the CLI as a user would (a sweep of ~500 cases): each ends with exit 2, one
line naming what is wrong, and nothing written."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress.cli import main

from conftest import tiny_cfg


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    torch.manual_seed(0)
    return compress.save_model(compress.load_model(tiny_cfg()), tmp_path_factory.mktemp("bi") / "art",
                               report={"stage": "test", "imgsz": 64})


def _rc(argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        return e.code


def one_line(capsys, argv, *needles):
    rc = _rc(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _yaml(tmp_path, **changes):
    d = tiny_cfg()
    d.pop("yaml_file")
    for k, v in changes.items():
        if k.startswith("row"):  # row_<i>=[...] replaces a backbone/head row
            i = int(k[3:])
            nb = len(d["backbone"])
            (d["backbone"] if i < nb else d["head"])[i if i < nb else i - nb] = v
        elif v is None:
            d.pop(k)
        else:
            d[k] = v
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


@pytest.mark.parametrize("changes,needle", [
    (dict(anchors=[]), "anchors"),
    (dict(anchors=[[10, 13, 16]] * 3), "anchors"),
    (dict(anchors=[[10, 13, 16, 30], [10, 13]] + [[1, 2]]), "same number of anchors"),
    (dict(anchors=[[10, -13, 16, 30, 33, 23]] * 3), "positive anchor size"),
    (dict(backbone={"a": 1}), "'backbone' and 'head' must be lists"),
    (dict(depth_multiple="abc"), "depth_multiple 'abc'"),
    (dict(width_multiple=-0.5), "width_multiple -0.5"),
    (dict(width_multiple=0), "width_multiple 0"),
    (dict(activation="nn.ReLU()"), "activation 'nn.ReLU()'"),
    (dict(kpt_shape=[17, 3]), "unknown key 'kpt_shape'"),
    (dict(row1=[-1, 1, "Conv", [32, "3", 2]]), "layer 1: Conv arg k='3'"),
    (dict(row1=[-1, 1, "Conv", [32, 0, 2]]), "layer 1: Conv arg k=0"),
    (dict(row11=[-1, 1, "nn.Upsample", [None, 2, "bogus"]]), "mode 'bogus'"),
    (dict(row11=[-1, 1, "nn.Upsample", [None, "two", "nearest"]]), "scale_factor 'two'"),
    (dict(row12=[[-1, 6], 1, "Concat", [5]]), "only channel concatenation"),
    (dict(row12=[[-1, 4], 1, "Concat", [1]]), "at different scales"),
    (dict(row2=[-1, 1, "C3", [16, True, 1, 0.5, {"cv1": -8, "cv2": 8, "m": [[8, 8]]}]]), "widths must be positive"),
])
def test_bad_model_yaml_names_file_and_layer(tmp_path, capsys, changes, needle):
    f = _yaml(tmp_path, **changes)
    one_line(capsys, ["info", "--cfg", f, "--imgsz", "64"], str(f), needle)


def test_non_text_yaml(tmp_path, capsys):
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    one_line(capsys, ["info", "--cfg", f], "not a readable text file")
    one_line(capsys, ["run", f], "binary.yaml")


@pytest.mark.parametrize("argv,needle", [
    (["info", "--cfg", "yolov5n", "--imgsz", "1048576"], "--imgsz 1048576: must be at most 4096"),
    (["prune", "--weights", "ART", "--ratio", "0.3", "--seed", "-1", "--out", "OUT"], "--seed -1"),
    (["train", "--weights", "ART", "--data", "DATA", "--seed", "99999999999", "--out", "OUT"], "--seed 99999999999"),
    (["train", "--weights", "ART", "--data", "DATA", "--epochs", "1", "--sparsity", "1e-3",
      "--sparsity-warmup-epochs", "5", "--out", "OUT"], "would never be applied"),
    (["prune", "--weights", "ART", "--ratio", "0.5", "--exclude", "", "--out", "OUT"], "an empty pattern"),
    (["slim", "--weights", "ART", "--data", "DATA", "--global-percent", "0.5", "--batch", "8", "--bn-batches", "100",
      "--out", "OUT"], "--bn-batches 100 x --batch 8 = 800 train images asked"),
    (["eagleeye", "--weights", "ART", "--data", "DATA", "--remain-ratio", "0.6", "--batch", "8", "--bn-batches",
      "100", "--out", "OUT"], "--bn-batches 100 x --batch 8 = 800 train images asked"),
    (["eagleeye", "--weights", "ART", "--data", "DATA", "--remain-ratio", "0.6", "--delta", "0.000001",
      "--out", "OUT"], "--delta"),
    (["train", "--weights", "ART", "--data", "DATA", "--hyp", "NAN", "--out", "OUT"], "lr0: expected a finite number"),
    (["train", "--weights", "ART", "--data", "DATA", "--hyp", "MOMENTUM", "--out", "OUT"], "momentum: 2.0 is out of range"),
    (["train", "--weights", "ART", "--data", "DATA", "--bogus", "1"], "compress train: error: unrecognized arguments"),
    (["data", "synth", "--classes", "9", "--out", "OUT"], "compress data synth: error: --classes 9"),
    (["data", "synth", "--seed", "-1", "--out", "OUT"], "--seed -1"),
])
def test_bad_values_before_any_work(tmp_path, art, synth_data, capsys, argv, needle):
    (tmp_path / "nan.yaml").write_text("lr0: .nan\n")
    (tmp_path / "mom.yaml").write_text("momentum: 2.0\n")
    subs = {"ART": art, "DATA": synth_data, "OUT": tmp_path / "out", "NAN": tmp_path / "nan.yaml",
            "MOMENTUM": tmp_path / "mom.yaml"}
    one_line(capsys, [subs.get(a, a) for a in argv], needle)
    assert not (tmp_path / "out").exists()


def test_no_command_prints_help(capsys):
    assert main([]) == 0 and "COMMAND" in capsys.readouterr().out


def test_bench_refuses_to_overwrite_a_run(tmp_path, art, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    before = (copy / "report.json").read_text()
    one_line(capsys, ["bench", "--weights", art, "--imgsz", "64", "--runs", "1", "--out", copy], "already holds a run")
    assert (copy / "report.json").read_text() == before


def test_resume_of_a_finished_run_leaves_it_usable(tmp_path, synth_data, tiny_cfg_file, capsys):
    run = tmp_path / "run"
    assert main(["train", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), "--epochs", "1", "--imgsz", "64",
                 "--batch", "8", "--workers", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    one_line(capsys, ["train", "--resume", run], "training already finished")
    assert not (run / ".unfinished.json").exists() and compress.load_model(run)


def test_train_on_unreadable_images_writes_nothing(tmp_path, tiny_cfg_file, capsys):
    from compress.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", n_train=2, n_val=2, imgsz=64)
    for f in (tmp_path / "d" / "images" / "train").iterdir():
        f.write_bytes(b"not an image")
    one_line(capsys, ["train", "--cfg", tiny_cfg_file, "--data", data, "--imgsz", "64", "--out", tmp_path / "out"],
             "none of the 2 images is readable")
    assert not (tmp_path / "out").exists()


RECIPE = """\
{name}data: {data}
model:
  {model}
imgsz: 64
stages:
{stages}"""


@pytest.mark.parametrize("name,model,stages,needle", [
    ("", "cfg: CFG", "  - train: {epochs: 1}\n  - prune: {ratio: 0.3, exclude: [nosuchlayer]}\n",
     "stage 2 (line 7): prune: --exclude nosuchlayer"),
    ("", "cfg: CFG", "  - train: {epochs: 1, sparsity: 0.001, exclude: [999]}\n", "stage 1 (line 6): train: --exclude 999"),
    ("", "cfg: CFG", "  - train: {epochs: 1}\n  - qat: {backend: Tensorrt, calib-batches: 50, batch: 8}\n",
     "--calib-batches 50 x --batch 8 = 400 train images asked"),
    ("", "cfg: CFG", "  - train: {epochs: 1}\n  - val: {task: test}\n", "no 'test' split"),
    ("", "cfg: CFG", "  - train: {epochs: 1}\n  - slim: {global-percent: 0.5, bn-batches: 50, batch: 8}\n",
     "--bn-batches 50 x --batch 8"),
    ("", "weights: WRONGNC", "  - val: {}\n", "nc=4 but the model predicts 2 classes"),
    ("name: ../../escaped\n", "cfg: CFG", "  - train: {epochs: 1}\n", "name '../../escaped'"),
    ("", "cfg: CFG", "  - train: {epochs: 1}\n  - eagleeye: {remain-ratio: 0.02}\n", "stage 2 (line 7): eagleeye: "),
])
def test_check_catches_what_a_run_would_trip_on(tmp_path, synth_data, tiny_cfg_file, capsys, name, model, stages,
                                                needle):
    wrong = compress.save_model(compress.load_model(tiny_cfg(nc=2)), tmp_path / "wrongnc")
    f = tmp_path / "r.yaml"
    f.write_text(RECIPE.format(name=name, data=synth_data, stages=stages,
                               model=model.replace("CFG", str(tiny_cfg_file)).replace("WRONGNC", str(wrong))))
    one_line(capsys, ["run", f, "--check"], needle)


def test_check_refuses_a_from_stage_out_of_range(tmp_path, synth_data, tiny_cfg_file, capsys):
    f = tmp_path / "r.yaml"
    f.write_text(RECIPE.format(name="", data=synth_data, model=f"cfg: {tiny_cfg_file}",
                               stages="  - train: {epochs: 1}\n"))
    one_line(capsys, ["run", f, "--check", "--from-stage", "9"], "--from-stage 9: the recipe has stages 1..1")


def test_recipe_paths_are_relative_to_the_recipe(tmp_path, synth_data, tiny_cfg_file, monkeypatch, capsys):
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    shutil.copy(tiny_cfg_file, rdir / "tiny.yaml")
    shutil.copytree(Path(synth_data).parent, rdir / "ds")
    (rdir / "r.yaml").write_text(RECIPE.format(name="", data="ds/data.yaml", model="cfg: tiny.yaml",
                                               stages="  - train: {epochs: 1}\n"))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ds").mkdir(parents=True)
    (elsewhere / "ds" / "data.yaml").write_text("train: nowhere\nval: nowhere\nnc: 1\n")  # must not be picked
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(rdir / "r.yaml"), "--check"]) == 0, capsys.readouterr().err
    assert "OK, 1 stages" in capsys.readouterr().out
