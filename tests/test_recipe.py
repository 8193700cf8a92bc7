"""Recipes: validation before anything runs, resume by stage, and every shipped recipe at smoke size."""
import json
from pathlib import Path

import pytest

from compress.errors import UserError
from compress.recipe import load_recipe, run_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
RECIPES.append(Path(__file__).resolve().parents[1] / "compress" / "recipes" / "demo.yaml")


def write(tmp_path, text):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    return f


GOOD = """\
data:
  synthetic: {{train: 16, val: 8, imgsz: 64}}
model:
  cfg: {cfg}
imgsz: 64
stages:
  - train: {{epochs: 1, batch: 8, workers: 0}}
  - prune: {{ratio: 0.3}}
  - finetune: {{epochs: 1, batch: 8, workers: 0}}
  - val: {{}}
"""


@pytest.mark.parametrize("stages,msg", [
    ("  - train: {epochs: 1}\n  - prnue: {}\n", "stage 2 (line 8): unknown stage 'prnue'"),
    ("  - train: {epochs: 1, lr: 3}\n", "stage 1 (line 7): stage 'train' has no option 'lr'"),
    ("  - train: {epochs: one}\n", "stage 1 (line 7): train: argument --epochs: invalid int value: 'one'"),
    ("  - train: {epochs: 1}\n  - prune: {ratio: 0.5, out: x}\n", "stage 2 (line 8): stage 'prune' has no option 'out'"),
])
def test_bad_stages_are_named_with_their_line(tmp_path, stages, msg):
    f = write(tmp_path, "data:\n  synthetic: {train: 8}\nmodel:\n  cfg: yolov5n\nimgsz: 64\nstages:\n" + stages)
    with pytest.raises(UserError) as e:
        load_recipe(f)
    assert msg in str(e.value) and str(f) in str(e.value)


@pytest.mark.parametrize("text,msg", [
    ("data: nowhere/data.yaml\nmodel: {cfg: yolov5n}\nstages: [val]\n", "no such dataset file 'nowhere/data.yaml'"),
    ("data: {synthetic: {trian: 3}}\nmodel: {cfg: yolov5n}\nstages: [val]\n", "unknown option 'trian'"),
    ("data: {synthetic: {}}\nmodel: {cfg: yolov5n}\nstages: [val]\nepochs: 3\n", "unknown key 'epochs'"),
    ("data: {synthetic: {}}\nstages: [val]\n", "missing key 'model'"),
    ("data: {synthetic: {}}\nmodel: {cfg: yolov5n}\nstages: []\n", "'stages' must be a non-empty list"),
])
def test_bad_recipe_top_level(tmp_path, text, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(write(tmp_path, text))


def test_run_resume_and_summary(tmp_path, tiny_cfg_file):
    f = write(tmp_path, GOOD.format(cfg=tiny_cfg_file))
    out = tmp_path / "out"
    s = run_recipe(f, out)
    assert [r["stage"] for r in s["stages"]] == ["1-train", "2-prune", "3-finetune", "4-val"]
    assert (out / "summary.md").is_file() and json.loads((out / "summary.json").read_text())["stages"]
    pruned, base = s["stages"][1], s["stages"][0]
    assert pruned["gflops"] < base["gflops"] and base["latency_ms"] > 0 and base["map50"] is not None
    mtime = (out / "3-finetune" / "weights.pt").stat().st_mtime
    run_recipe(f, out)  # everything done: nothing reruns
    assert (out / "3-finetune" / "weights.pt").stat().st_mtime == mtime
    run_recipe(f, out, from_stage=3)  # forced from stage 3
    assert (out / "3-finetune" / "weights.pt").stat().st_mtime != mtime


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipe_runs_at_smoke_size(recipe, tmp_path):
    s = run_recipe(recipe, tmp_path / "out", smoke=True)
    assert s["stages"] and (tmp_path / "out" / "summary.md").is_file()


CHECK_BASE = "data:\n  synthetic: {{train: 8, val: 4{syn}}}\nmodel:\n  {model}\nimgsz: {imgsz}\nstages:\n{stages}"


@pytest.mark.parametrize("syn,model,imgsz,stages,msg", [
    ("", "cfg: yolov5n", 64, "  - train: {epochs: 1}\n  - qat: {backend: FOO}\n",
     "stage 2 (line 8): qat: --backend FOO: unknown QAT backend"),
    ("", "cfg: yolov5n", 64, "  - eagleeye: {remain-ratio: 1.5}\n",
     "stage 1 (line 7): eagleeye: --remain-ratio 1.5: must be in (0, 1]"),
    ("", "cfg: yolov5n", 64, "  - train: {epochs: 1, imgsz: 33}\n", "stage 1 (line 7): train: --imgsz 33"),
    ("", "cfg: yolov5n", 33, "  - train: {epochs: 1}\n", "imgsz 33: must be a positive multiple of 32"),
    ("", "cfg: yolov5n", 64, "  - train: {epochs: 1}\n  - slim: {global-percent: 1.0}\n",
     "stage 2 (line 8): slim: --global-percent 1.0: must be in [0, 1)"),
    (", classes: 9", "cfg: yolov5n", 64, "  - train: {epochs: 1}\n",
     "data.synthetic.classes: expected an integer 1..5"),
    ("", "cfg: yolov5n", 64, "  - finetune: {epochs: 1}\n",
     "stage 1 (line 7): finetune has no trained model to start from"),
    ("", "cfg: yolov5n", 64, "  - qat: {backend: Tensorrt}\n",
     "stage 1 (line 7): qat has no trained model to start from"),
    ("", "cfg: yolov5n", 64, "  - train: {epochs: 1, optimizer: Lion}\n",
     "train: --optimizer Lion: choose one of SGD"),
    ("", "cfg: yolov5n", 64, "  - train: {epochs: 1}\n  - finetune: {epochs: 1, teacher: parent}\n",
     "stage 2 (line 8): finetune: teacher: parent is the model an earlier prune, slim or eagleeye stage"),
    ("", "cfg: yolov5n", 64, "  - train: {epochs: 1}\n  - prune: {ratio: 0.3}\n  - finetune: {distill-weight: 2}\n",
     "stage 3 (line 9): finetune: --distill-weight only applies to distillation"),
    ("", "cfg: yolov5n", 64, "  - train: {epochs: 1}\n  - prune: {ratio: 0.3}\n  - finetune: {teacher: nowhere}\n",
     "stage 3 (line 9): finetune: --teacher nowhere: no such artifact"),
    ("", "weights: UNREADABLE", 64, "  - val: {}\n", "r.yaml: model: "),
    ("", "weights: UNREADABLE", 64, "  - val: {}\n", "garbage.pt: not a readable"),
])
def test_check_checks_values_files_and_inputs(tmp_path, syn, model, imgsz, stages, msg, capsys):
    from compress.cli import main

    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint")
    f = write(tmp_path, CHECK_BASE.format(syn=syn, model=model.replace("UNREADABLE", str(bad)), imgsz=imgsz,
                                          stages=stages))
    assert main(["run", str(f), "--check"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
