"""Distillation (``--teacher``): the loss terms, the teacher found through the lineage, the CLI on pruned and
QAT models, adapters kept out of the artifact, exact resume, 2-process gloo DDP and recipes."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from compress.engine.distill import FeatureAdapters, binary_kl, cwd_loss, output_distill_loss
from compress.errors import UserError
from compress.model.artifact import load_model, save_model
from compress.stages.distill import pruned_from, resolve_teacher

from conftest import tiny_cfg

GAINS = {"obj": 1.0, "cls": 0.5, "box": 0.05}
BALANCE = [4.0, 1.0, 0.4]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "compress.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


def head_outputs(nc=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, s, s, 5 + nc, generator=g) for s in (8, 4, 2)]


ANCHORS = torch.tensor([[[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]]] * 3)


def test_binary_kl_is_zero_where_student_agrees():
    p = torch.tensor([0.01, 0.3, 0.5, 0.9])
    assert binary_kl(torch.logit(p), p).abs().max() < 1e-5
    assert (binary_kl(torch.logit(p) + 1.0, p) > 1e-3).all()


def test_output_distillation_zero_on_itself_and_weighted_by_teacher_objectness():
    t = head_outputs()
    zero = output_distill_loss([x.clone() for x in t], t, ANCHORS, GAINS, BALANCE)
    assert all(float(z) < 1e-5 for z in zero)
    # the teacher sees objects on level 0 only; other levels are background
    for lvl, x in enumerate(t):
        x[..., 4] = 6.0 if lvl == 0 else -12.0
    obj0, cls0, box0 = output_distill_loss([x.clone() for x in t], t, ANCHORS, GAINS, BALANCE)
    # changing classes and boxes where the teacher sees background changes (almost) nothing ...
    s = [x.clone() for x in t]
    s[1][..., :4] += 2.0
    s[1][..., 5:] += 3.0
    obj, cls, box = output_distill_loss(s, t, ANCHORS, GAINS, BALANCE)
    assert float(cls) < 1e-4 and float(box) < 1e-4 and float(obj) < 1e-5
    # ... the same change where it sees objects is what the terms are made of
    s = [x.clone() for x in t]
    s[0][..., :4] += 2.0
    s[0][..., 5:] += 3.0
    obj, cls, box = output_distill_loss(s, t, ANCHORS, GAINS, BALANCE)
    assert float(cls) > 0.05 and float(box) > 0.01
    # objectness is distilled on every anchor, weighted by the level balance
    s = [x.clone() for x in t]
    s[2][..., 4] += 8.0
    obj2 = output_distill_loss(s, t, ANCHORS, GAINS, BALANCE)[0]
    s = [x.clone() for x in t]
    s[1][..., 4] += 8.0
    obj1 = output_distill_loss(s, t, ANCHORS, GAINS, BALANCE)[0]
    assert float(obj2) > 1e-3 and float(obj1) / float(obj2) == pytest.approx(BALANCE[1] / BALANCE[2], rel=1e-3)


def test_output_distillation_gradient_reaches_the_student_only():
    t = head_outputs()
    s = [x.clone().requires_grad_(True) for x in head_outputs(seed=1)]
    tt = [x.clone().requires_grad_(True) for x in t]
    sum(output_distill_loss(s, tt, ANCHORS, GAINS, BALANCE)).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in tt)


def test_channel_wise_distillation():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 6, 7, generator=g)
    assert float(cwd_loss(t.clone(), t)) < 1e-6
    # a spatial softmax per channel: a constant shift of a channel's map changes nothing ...
    assert float(cwd_loss(t + torch.arange(5.0).view(1, 5, 1, 1), t)) < 1e-5
    # ... moving its activations around does
    s = t.flip(-1)
    assert float(cwd_loss(s, t)) > 0.05
    # the temperature softens both maps; tau^2 keeps the gradient scale comparable
    assert float(cwd_loss(s, t, tau=4.0)) != pytest.approx(float(cwd_loss(s, t)), rel=1e-3)


def test_feature_adapters_map_widths_and_keep_equal_ones_as_identity():
    a = FeatureAdapters([8, 16, 32], [8, 24, 64])
    assert isinstance(a.m[0], torch.nn.Identity)
    out = a([torch.zeros(1, 8, 4, 4), torch.zeros(1, 16, 2, 2), torch.zeros(1, 32, 1, 1)])
    assert [o.shape[1] for o in out] == [8, 24, 64]


# --- the teacher found through report.json lineage -------------------------------------------------------


def chain(tmp_path, stages):
    """Artifacts named after ``stages``, each the parent of the next; returns their folders."""
    model, folders, parent = load_model(tiny_cfg()), [], None
    for i, stage in enumerate(stages):
        folders.append(save_model(model, tmp_path / f"{i}-{stage}",
                                  report={"stage": stage, "parent": str(parent) if parent else None}))
        parent = folders[-1]
    return folders


def test_parent_is_what_the_nearest_pruning_stage_started_from(tmp_path):
    f = chain(tmp_path, ["train", "eagleeye", "train", "qat"])
    assert pruned_from(f[3]) == f[0].absolute()
    assert pruned_from(f[3] / "weights.pt") == f[0].absolute()
    assert resolve_teacher("parent", str(f[2])) == f[0].absolute()
    # pruned twice: the nearest pruning stage's parent (the model that was pruned last)
    g = chain(tmp_path / "g", ["train", "prune", "train", "slim", "train"])
    assert pruned_from(g[4]) == g[2].absolute()


def test_parent_errors_name_what_is_missing(tmp_path):
    f = chain(tmp_path, ["train", "train"])
    with pytest.raises(UserError, match="was not pruned .*its lineage: train"):
        pruned_from(f[1])
    g = chain(tmp_path / "g", ["train", "prune", "train"])
    import shutil

    shutil.rmtree(g[0])
    with pytest.raises(UserError, match="names its parent .* which does not exist"):
        pruned_from(g[2])
    (g[1] / "report.json").unlink()
    with pytest.raises(UserError, match="has no report.json"):
        pruned_from(g[2])
    with pytest.raises(UserError, match="no such artifact"):
        resolve_teacher(str(tmp_path / "nowhere"), str(g[2]))


# --- end to end from the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, synth_data):
    """A trained tiny model (width 0.25) and an L1-pruned copy of it at 60% of the FLOPs, made by the CLI."""
    root = tmp_path_factory.mktemp("distill")
    cfg = root / "tiny.yaml"
    d = tiny_cfg("yolov5n", width=0.25)
    d.pop("yaml_file")
    cfg.write_text(yaml.safe_dump(d))
    p = cli("train", "--cfg", cfg, "--data", synth_data, "--epochs", 1, "--imgsz", 64, "--batch", 8,
            "--workers", 0, "--out", root / "base")
    assert p.returncode == 0, p.stderr
    p = cli("prune", "--weights", root / "base", "--ratio", 0.4, "--imgsz", 64, "--out", root / "pruned")
    assert p.returncode == 0, p.stderr
    return root


def finetune_args(lineage, synth_data, out, *extra):
    return ["train", "--weights", lineage / "pruned", "--data", synth_data, "--epochs", 1, "--imgsz", 64,
            "--batch", 8, "--workers", 0, "--out", out, *extra]


def test_cli_finetune_with_parent_teacher(lineage, synth_data, tmp_path):
    out = tmp_path / "ft"
    p = cli(*finetune_args(lineage, synth_data, out, "--teacher", "parent", "--distill", "both", "--distill-weight", 2))
    assert p.returncode == 0, p.stderr
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    for k in ("box_loss", "distill_obj", "distill_cls", "distill_box", "distill_feat"):
        assert k in header
    rep = json.loads((out / "report.json").read_text())
    assert rep["distill"]["teacher"] == str((lineage / "base").absolute())
    assert rep["distill"]["distill_weight"] == 2.0 and rep["distill"]["distill"] == "both"
    assert rep["distill"]["last_epoch"]["distill_feat"] > 0
    # the adapters (the pruned student is narrower than its teacher) live in the train state only
    sd = torch.load(out / "weights.pt", weights_only=True)
    student = load_model(out)
    assert set(sd) == set(student.state_dict())
    st = torch.load(out / "last" / "train_state.pt", weights_only=True)
    assert any(k.startswith("distill_adapters.") for k in st["aux"])
    assert student.model[-1].anchors.shape == load_model(lineage / "base").model[-1].anchors.shape


def test_cli_distill_bad_input(lineage, synth_data, tmp_path, tiny_cfg_file):
    other_nc = tmp_path / "nc2"
    save_model(load_model(tiny_cfg(nc=2)), other_nc, report={"stage": "train"})
    cases = [
        (["--teacher", tmp_path / "missing"], "no such artifact"),
        (["--distill-weight", 2], "only applies to distillation"),
        (["--teacher", "parent", "--distill-weight", 0], "--distill-weight 0"),
        (["--teacher", "parent", "--distill", "logits"], "invalid choice"),
        (["--teacher", other_nc], "use --distill feature"),
    ]
    for extra, msg in cases:
        p = cli(*finetune_args(lineage, synth_data, tmp_path / "bad", *extra))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and msg in p.stderr, (extra, p.stderr)
        assert not (tmp_path / "bad").exists()
    p = cli("train", "--weights", lineage / "base", "--data", synth_data, "--epochs", 1, "--imgsz", 64,
            "--teacher", "parent", "--out", tmp_path / "bad")
    assert p.returncode == 2 and "was not pruned" in p.stderr, p.stderr
    # feature distillation needs only the same strides: a teacher with other classes is fine
    p = cli(*finetune_args(lineage, synth_data, tmp_path / "feat", "--teacher", other_nc, "--distill", "feature"))
    assert p.returncode == 0, p.stderr
    assert "distill_obj" not in (tmp_path / "feat" / "results.csv").read_text().splitlines()[0]


def test_resume_restores_adapters_exactly(lineage, synth_data, tmp_path):
    from compress.engine.trainer import TrainOptions, load_options, resume, save_options, train
    from compress.stages.distill import DistillCallback
    from compress.stages.train import callbacks_from_extra

    from test_train import StopAfterFirstEpoch

    def run(folder, callbacks):
        cb = DistillCallback(lineage / "base", "both", 1.0, 2.0)
        o = TrainOptions(data=str(synth_data), weights=str(lineage / "pruned"), epochs=2, imgsz=64, batch=8,
                         workers=0, out=str(folder), progress=False, extra=cb.options())
        save_options(o)
        torch.manual_seed(0)
        return train(o, [*callbacks, cb], model=load_model(None, lineage / "pruned"))

    run(tmp_path / "a", [])
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", [StopAfterFirstEpoch()])
    rep = resume(tmp_path / "b", callbacks_from_extra(load_options(tmp_path / "b").extra))
    assert rep["final_epoch"] == 2 and rep["distill"]["distill_temperature"] == 2.0
    sa = torch.load(tmp_path / "a" / "last" / "train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "last" / "train_state.pt", weights_only=True)
    for part in ("model", "aux"):
        assert sa[part].keys() == sb[part].keys() and all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])
    ra = (tmp_path / "a" / "results.csv").read_text().splitlines()
    rb = (tmp_path / "b" / "results.csv").read_text().splitlines()
    assert ra == rb


def test_two_process_gloo_ddp_with_teacher(lineage, synth_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
            "-m", "compress.cli", *finetune_args(lineage, synth_data, tmp_path / "ddp", "--teacher", "parent",
                                                 "--distill", "both")]
    args[args.index("--batch") + 1] = 4
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 process(es)" in p.stdout
    rep = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert rep["distill"]["last_epoch"]["distill_feat"] > 0


RECIPE = """\
data:
  synthetic: {{train: 16, val: 8, imgsz: 64}}
model:
  cfg: {cfg}
imgsz: 64
stages:
  - train: {{epochs: 1, batch: 8, workers: 0}}
  - prune: {{ratio: 0.4}}
  - finetune: {{epochs: 1, batch: 8, workers: 0, teacher: parent}}
  - qat: {{backend: Tensorrt, epochs: 1, batch: 8, calib-batches: 2, workers: 0, teacher: parent,
          distill: both}}
"""


def test_recipe_finetune_and_qat_with_parent_teacher(lineage, tmp_path):
    from compress.recipe import run_recipe

    f = tmp_path / "r.yaml"
    f.write_text(RECIPE.format(cfg=lineage / "tiny.yaml"))
    out = tmp_path / "out"
    run_recipe(f, out)
    base = str((out / "1-train").absolute())
    ft = json.loads((out / "3-finetune" / "report.json").read_text())
    qat = json.loads((out / "4-qat" / "report.json").read_text())
    assert ft["distill"]["teacher"] == base and qat["distill"]["teacher"] == base
    assert ft["distill"]["distill"] == "output" and ft["distill"]["distill_weight"] == 3.0
    assert "distill_feat" not in ft["distill"]["last_epoch"] and "distill_cls" in ft["distill"]["last_epoch"]
    assert qat["distill"]["distill"] == "both" and qat["distill"]["last_epoch"]["distill_feat"] > 0
    assert set(torch.load(out / "4-qat" / "weights.pt", weights_only=True)) == set(
        load_model(out / "4-qat").state_dict())
