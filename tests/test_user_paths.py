"""The paths users walk: the README's commands from a fresh working directory with the default (relative)
output folders, outputs checked before any work, and runs that crash and are run again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress.cli import main

from conftest import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def compress_cmd():
    """The console script users type (``compress``), or the module when it is not installed beside python."""
    exe = Path(sys.executable).with_name("compress")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "compress.cli"]


def run_in(cwd, *args, timeout=600, env=None):
    """Run ``compress ARGS`` in ``cwd`` as a user does; returns the CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([*compress_cmd(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


def one_line_error(p, *needles):
    """Exit 2, exactly one line on stderr, no traceback, every needle in it."""
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny trained-looking artifact (random weights; report says imgsz 64)."""
    torch.manual_seed(0)
    m = compress.load_model(tiny_cfg())
    return compress.save_model(m, tmp_path_factory.mktemp("art") / "tiny", report={"stage": "test", "imgsz": 64})


# ------------------------------------------------------------------------------ the README's commands
def test_demo_smoke_from_a_fresh_directory(tmp_path):
    p = run_in(tmp_path, "demo", "--smoke")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for row in ("1-train", "2-eagleeye", "3-finetune", "4-qat"):
        assert row in out, out[-2000:]
    assert "mAP50-95" in out and "latency ms" in out and "summary: runs/demo/summary.md" in out
    demo = tmp_path / "runs" / "demo"
    assert (demo / "summary.md").is_file() and (demo / "4-qat" / "deploy" / "model_qdq.onnx").is_file()
    assert not list(demo.rglob(".unfinished.json")) and not list(demo.rglob(".qat-deploy-*"))


@pytest.mark.parametrize("out", [None, "rel/q"], ids=["default-out", "relative-out"])
def test_qat_with_default_and_relative_out(tmp_path, art, synth_data, out):
    args = ["qat", "--weights", art, "--data", synth_data, "--backend", "Tensorrt", "--epochs", "1", "--imgsz", "64",
            "--batch", "8", "--calib-batches", "1", "--workers", "0"]
    p = run_in(tmp_path, *args, *(["--out", out] if out else []))
    assert p.returncode == 0, p.stderr[-3000:]
    folder = tmp_path / (out or "runs/qat/exp")
    assert (folder / "deploy" / "model_qdq.onnx").is_file() and (folder / "qat_state.pt").is_file()
    assert not (folder / ".unfinished.json").exists()


RECIPE = """\
name: tiny
data:
  synthetic: {{train: 16, val: 8, imgsz: 64}}
model:
  cfg: {cfg}
imgsz: 64
stages:
  - train: {{epochs: 1, batch: 8, workers: 0}}
  - qat: {{backend: Tensorrt, epochs: 1, batch: 8, calib-batches: 1, workers: 0}}
"""


@pytest.mark.parametrize("out", [None, "rel/r"], ids=["default-out", "relative-out"])
def test_recipe_with_default_and_relative_out(tmp_path, tiny_cfg_file, out):
    (tmp_path / "r.yaml").write_text(RECIPE.format(cfg=tiny_cfg_file))
    p = run_in(tmp_path, "run", "r.yaml", "--smoke", *(["--out", out] if out else []))
    assert p.returncode == 0, p.stderr[-3000:]
    folder = tmp_path / (out or "runs/recipes/tiny-smoke")
    assert (folder / "summary.md").is_file() and (folder / "2-qat" / "deploy" / "model_qdq.onnx").is_file()
    assert "2-qat" in p.stdout and "mAP: COCO mAP" in p.stdout


# ------------------------------------------------------------------------------ outputs checked first
OUT_COMMANDS = {
    "train": lambda a, d: ["train", "--weights", a, "--data", d, "--epochs", "1"],
    "val": lambda a, d: ["val", "--weights", a, "--data", d],
    "prune": lambda a, d: ["prune", "--weights", a, "--ratio", "0.3"],
    "eagleeye": lambda a, d: ["eagleeye", "--weights", a, "--data", d, "--remain-ratio", "0.6"],
    "bench": lambda a, d: ["bench", "--weights", a],
    "synth": lambda a, d: ["data", "synth", "--train", "2", "--val", "2"],
    "export": lambda a, d: ["export", "--weights", a],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_bad_out_is_refused_before_any_work(tmp_path, art, synth_data, command, capsys):
    base = OUT_COMMANDS[command](str(art), str(synth_data))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [(a_file / "sub", "is a file, not a folder"), (Path("/proc/compress-no-write/x"), "cannot write")]
    if command != "export":  # export's --out is a file: an existing one is overwritten atomically
        cases.insert(0, (a_file, "is a file"))
    for out, msg in cases:
        rc = main([*base, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, (out, err)
        assert a_file.read_text() == "keep me"
    assert not (tmp_path / "runs").exists()


def test_out_holding_an_artifact_is_refused(tmp_path, art, capsys):
    rc = main(["prune", "--weights", str(art), "--ratio", "0.3", "--out", str(art)])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a run (model.yaml)" in err and err.count("\n") == 1


def test_train_writes_nothing_before_its_inputs_are_checked(tmp_path, tiny_cfg_file, synth_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: nowhere/\nval: nowhere/\nnc: 4\n")
    for args, msg in [(["--data", bad], "does not exist"), (["--data", synth_data, "--imgsz", "33"], "--imgsz 33"),
                      (["--data", synth_data, "--hyp", "nope.yaml"], "nope.yaml"),
                      (["--data", synth_data, "--epochs", "0"], "--epochs 0")]:
        one_line_error(run_in(tmp_path, "train", "--cfg", tiny_cfg_file, *args), msg)
        assert not (tmp_path / "runs").exists()
    p = run_in(tmp_path, "train", "--cfg", tiny_cfg_file, "--data", synth_data, "--epochs", "1", "--imgsz", "64",
               "--batch", "8", "--workers", "0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "runs" / "train")) == ["exp"]  # the failures took no exp folder
    opt = yaml.safe_load((tmp_path / "runs" / "train" / "exp" / "opt.yaml").read_text())
    assert Path(opt["data"]).is_absolute() and Path(opt["out"]).is_absolute()


@pytest.mark.parametrize("args,needles", [
    (["val", "--conf", "2"], ["--conf 2.0: must be in [0, 1]"]),
    (["val", "--iou", "-1"], ["--iou -1.0: must be in [0, 1]"]),
    (["export", "--opset", "5"], ["--opset 5: must be in 9.."]),
    (["export", "--opset", "99"], ["--opset 99: must be in 9.."]),
    (["prune"], ["the following arguments are required: --ratio"]),
    (["bench", "--weights", "missing/"], ["missing/: no such file or directory"]),
    (["eagleeye", "--remain-ratio", "0.6", "--resume", "--out", "EMPTY"], ["holds no EagleEye search"]),
])
def test_bad_values_are_one_line_errors(tmp_path, art, synth_data, args, needles, capsys):
    (tmp_path / "empty").mkdir()
    cmd, rest = args[0], [str(tmp_path / "empty") if a == "EMPTY" else a for a in args[1:]]
    common = {"val": ["--weights", str(art), "--data", str(synth_data)], "export": ["--weights", str(art)],
              "prune": ["--weights", str(art)], "bench": [],
              "eagleeye": ["--weights", str(art), "--data", str(synth_data), "--workers", "0"]}[cmd]
    rc = main([cmd, *common, *rest]) if cmd != "prune" else _exit_code([cmd, *common, *rest])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors exit from inside parse_args
        return e.code


def test_detect_nc_as_a_string_names_the_layer(tmp_path):
    d = tiny_cfg()
    d.pop("yaml_file")
    d["head"][-1][3][0] = "four"
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(d))
    one_line_error(run_in(tmp_path, "info", "--cfg", f, "--imgsz", "64"), f"{f}: layer 24: Detect", "'four'")


def test_corrupt_artifact_weights_get_one_line(tmp_path, art):
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    (bad / "weights.pt").write_bytes((art / "weights.pt").read_bytes()[:500])
    err = one_line_error(run_in(tmp_path, "info", "--weights", bad), "weights.pt: not a readable weights file")
    assert "weights_only" not in err


def test_empty_labels_warn(tmp_path):
    from compress.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", n_train=3, n_val=2, imgsz=64)
    for f in (tmp_path / "d" / "labels").rglob("*.txt"):
        f.write_text("")
    p = run_in(tmp_path, "data", "check", "--data", data)
    assert p.returncode == 0 and "no label file holds a box" in p.stderr and "warning" not in p.stdout


def test_data_check_into_a_closed_pipe_is_quiet(tmp_path, synth_data):
    proc = subprocess.Popen([*compress_cmd(), "data", "check", "--data", str(synth_data)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # like `| head` that has already exited
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_every_flag_has_help_and_shows_its_default():
    from compress.cli import build_parser

    import argparse

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.description, name
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help, (name, a.option_strings)
    val = " ".join(sub.choices["val"].format_help().split())
    assert "(default: 0.001)" in val and "artifact's own, else 640" in val


# ------------------------------------------------------------------------------ crash, then run again
class Crash(Exception):
    pass


def crash_training_after_first_epoch(monkeypatch):
    """Make the trainer die right after it saved epoch 1 (checkpoint and artifact written): a power cut."""
    import compress.engine.trainer as trainer

    save = trainer.Trainer._save

    def crash_after_first(self, epoch, improved, metrics):
        save(self, epoch, improved, metrics)
        if epoch == 0:
            raise Crash("power cut")

    monkeypatch.setattr(trainer.Trainer, "_save", crash_after_first)


def test_unfinished_train_is_refused_as_weights_and_resumes(tmp_path, tiny_cfg_file, synth_data, monkeypatch,
                                                              capsys):
    out = tmp_path / "run"
    crash_training_after_first_epoch(monkeypatch)
    args = ["train", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), "--epochs", "2", "--imgsz", "64",
            "--batch", "8", "--workers", "0", "--out", str(out)]
    with pytest.raises(Crash):
        main(args)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["val", "--weights", str(out), "--data", str(synth_data)]) == 2
    assert "an unfinished train run" in capsys.readouterr().err
    # --resume with an option that would change the run is refused; a safe one is applied
    assert main(["train", "--resume", str(out), "--data", str(tiny_cfg_file)]) == 2
    assert "differs from the recorded" in capsys.readouterr().err
    first = torch.load(out / "last" / "train_state.pt", weights_only=True)["seconds"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    p = run_in(other, "train", "--resume", out, "--workers", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "lr_scheduler.step()" not in p.stderr and "--workers 1 replaces the recorded 0" in p.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["final_epoch"] == 2 and rep["train_seconds"] >= first
    assert not (out / ".unfinished.json").exists()
    assert main(["val", "--weights", str(out), "--data", str(synth_data), "--out", str(tmp_path / "v")]) == 0


RESUME_RECIPE = """\
name: resumable
data: {data}
model:
  cfg: {cfg}
imgsz: 64
stages:
  - train: {{epochs: 2, batch: 8, workers: 0}}
  - eagleeye: {{remain-ratio: 0.6, candidates: 4, bn-batches: 1, eval-batches: 1, batch: 8, workers: 0, top-k: 1}}
"""


def test_recipe_rerun_resumes_the_interrupted_stage(tmp_path, tiny_cfg_file, synth_data, monkeypatch, capsys):
    import compress.stages.eagleeye as ee
    from compress.recipe import run_recipe

    f = tmp_path / "r.yaml"
    f.write_text(RESUME_RECIPE.format(data=synth_data, cfg=tiny_cfg_file))
    out = tmp_path / "out"
    crash_training_after_first_epoch(monkeypatch)
    with pytest.raises(Crash):
        run_recipe(f, out)
    monkeypatch.undo()
    one = ee._one_candidate

    def crash_at_two(o, sampler, scorer, index, rank):
        if index == 2:
            raise Crash("power cut")
        return one(o, sampler, scorer, index, rank)

    monkeypatch.setattr(ee, "_one_candidate", crash_at_two)
    with pytest.raises(Crash):
        run_recipe(f, out)  # resumes the train stage, finishes it, crashes in the search
    assert "[1/2] train: resuming the interrupted run" in capsys.readouterr().out
    history = (out / "1-train" / "results.csv").read_text().splitlines()
    assert len(history) == 3  # header + epoch 1 of the first run + epoch 2 of the resumed one
    first_two = (out / "2-eagleeye" / "candidates.jsonl").read_text()
    assert len(first_two.splitlines()) == 2
    monkeypatch.undo()
    s = run_recipe(f, out)
    text = capsys.readouterr().out
    assert "[1/2] train: done before, skipped" in text and "[2/2] eagleeye: resuming the interrupted run" in text
    cands = (out / "2-eagleeye" / "candidates.jsonl").read_text()
    assert cands.startswith(first_two) and len(cands.splitlines()) == 4
    assert [r["stage"] for r in s["stages"]] == ["1-train", "2-eagleeye"]


def test_resume_needs_a_folder(capsys):
    assert main(["train", "--resume"]) == 2
    assert "--resume needs the run folder" in capsys.readouterr().err
