"""Network Slimming: the sparsity gradient term and schedules, the global threshold and rounding, coupled
masks, a train --sparsity -> slim -> fine-tune round from the CLI, resume, and one-line errors."""
import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from compress.cli import main
from compress.errors import UserError
from compress.model.artifact import load_model, save_model
from compress.model.yolo import Model
from compress.prune import apply_plan_to_model, channel_groups
from compress.prune.slim import (
    channel_scores, gamma_stats, not_sparse_warning, prunable_bn_keys, slim_plan, sparsity_at,
)
from compress.stages.sparsity import SparsityCallback

from conftest import tiny_cfg


def bn_modules(m):
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)}


def fake_trainer(model, epoch=0, epochs=4):
    return SimpleNamespace(model=model, float_model=model, epoch=epoch, opts=SimpleNamespace(epochs=epochs))


# ------------------------------------------------------------------------------------ sparsity term
def test_sparsity_gradient_is_exact_and_skips_unprunable_bns():
    torch.manual_seed(0)
    m = Model(tiny_cfg())
    for bn in bn_modules(m).values():  # gammas of both signs, so sign() matters
        bn.weight.data.uniform_(-1, 1)
    out = m(torch.rand(2, 3, 32, 32))
    sum(o.square().mean() for o in out).backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters()}

    s = 0.05
    cb = SparsityCallback(s, exclude=["0", "model.9"])
    t = fake_trainer(m)
    cb.on_prepare(t)
    cb.on_train_start(t)
    cb.on_before_step(t)
    keys = set(cb.keys)
    assert "model.0.bn.weight" not in keys and "model.9.cv1.bn.weight" not in keys
    assert {"model.1.bn.weight", "model.2.m.0.cv2.bn.weight", "model.23.cv3.bn.weight"} <= keys
    for n, p in m.named_parameters():
        if n in keys:
            assert torch.allclose(p.grad, before[n] + s * torch.sign(p.detach()), rtol=0, atol=1e-7), n
        else:  # excluded BNs, BN biases, conv and Detect weights: untouched
            assert torch.equal(p.grad, before[n]), n

    # warmup epoch: no term at all
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    cb2 = SparsityCallback(s, warmup_epochs=1)
    cb2.on_prepare(t)
    cb2.on_train_start(t)
    cb2.on_before_step(fake_trainer(m, epoch=0))
    assert all(torch.equal(p.grad, grads[n]) for n, p in m.named_parameters())


def test_prunable_bn_keys_leave_out_shuffle_block_outputs():
    cg = channel_groups(tiny_cfg("shufflenetv2-yolov5"))
    keys = set(prunable_bn_keys(cg))
    unprunable = {k for g in cg.groups if not g.prunable for k in g.producers if k.endswith(".bn.weight")}
    assert keys and unprunable and not keys & unprunable
    assert any(".branch2.2.bn.weight" in k for k in unprunable)  # ShuffleBlock output halves stay
    assert any(".branch2.0.bn.weight" in k for k in keys)  # the hidden width is prunable


def test_schedules():
    assert [sparsity_at(1e-3, e, 5) for e in range(5)] == [1e-3] * 5
    assert [sparsity_at(1e-3, e, 5, warmup_epochs=2) for e in range(5)] == [0, 0, 1e-3, 1e-3, 1e-3]
    cos = [sparsity_at(1.0, e, 5, "cosine-decay", 1) for e in range(5)]
    want = [0.0, 1.0, 0.01 + 0.99 * 0.75, 0.01 + 0.99 * 0.25, 0.01]
    assert cos == pytest.approx(want, abs=1e-12)
    assert sparsity_at(1.0, 0, 1, "cosine-decay") == 1.0
    with pytest.raises(UserError, match="--sparsity -1"):
        SparsityCallback(-1)
    with pytest.raises(UserError, match="--sparsity-schedule"):
        SparsityCallback(1e-3, "linear")
    cb = SparsityCallback(1e-3, "cosine-decay", 2, ["0"])
    again = SparsityCallback.from_options(cb.options())
    assert again.options() == cb.options() and SparsityCallback.from_options({}) is None


# ------------------------------------------------------------------------------------ threshold
def graded_state(model):
    """All prunable channels score 1 + tiny distinct offsets, except 20 channels of model.3, 5 of model.5
    and all 128 of model.7 which score 1e-3 * (1 + j / 1000)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    cg = channel_groups(model)
    off = 0
    for k in prunable_bn_keys(cg):
        n = sd[k].numel()
        sd[k] = 1 + (torch.arange(n, dtype=torch.float32) + off) * 1e-6
        off += n
    small = {"model.3.bn.weight": 20, "model.5.bn.weight": 5, "model.7.bn.weight": 128}
    for k, n in small.items():
        sd[k][:n] = 1e-3 * (1 + torch.arange(n, dtype=torch.float32) / 1000)
    return cg, sd


def test_global_threshold_rounding_and_minimum():
    cg, sd = graded_state(Model(tiny_cfg()))
    n_all = sum(g.size for g in cg.prunable)
    assert n_all == 2176
    sp = slim_plan(cg, sd, 153 / n_all)  # exactly the 153 small channels fall under the threshold
    assert sp.threshold == pytest.approx(1.0, abs=1e-2) and sp.below == pytest.approx(153 / n_all)
    # model.3: 12 above -> nearest multiple of 8 is 16 (the 4 best small ones are kept too);
    # model.5: 59 above -> 56 (the 3 lowest large ones go); model.7: 0 above -> held at the minimum 8
    assert sp.counts["model.3"] == 16 and sp.counts["model.5"] == 56 and sp.counts["model.7"] == 8
    assert sp.held == {"model.7": 0}
    assert torch.equal(sp.plan["model.3"], torch.cat([torch.arange(16, 20), torch.arange(20, 32)]))
    assert torch.equal(sp.plan["model.5"], torch.cat([torch.arange(8, 64)]))
    assert torch.equal(sp.plan["model.7"], torch.arange(120, 128))
    assert all(c == g.size or c % 8 == 0 for g in cg.prunable for c in [sp.counts[g.name]])
    assert set(sp.plan) == {"model.3", "model.5", "model.7"}  # every other group stays whole
    assert sp.removed == pytest.approx((16 + 8 + 120) / n_all)
    assert sp.gamma["lt_1e-2"] == pytest.approx(153 / sum(sd[k].numel() for k in prunable_bn_keys(cg)))

    # barely trained weights (one big tie at 1.0) still lose the asked share: ties are cut evenly
    tied = {k: (torch.ones_like(v) if k in prunable_bn_keys(cg) else v) for k, v in sd.items()}
    tied["model.0.bn.weight"][0] = 0.5
    assert slim_plan(cg, tied, 0.5).removed == pytest.approx(0.5, abs=0.03)

    zero = slim_plan(cg, sd, 0.0)
    assert zero.plan == {} and zero.removed == 0 and all(zero.counts[g.name] == g.size for g in cg.prunable)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"--global-percent .*must be in \[0, 1\)"):
            slim_plan(cg, sd, bad)


def test_sparse_rule_and_untrained_weights():
    assert not_sparse_warning(gamma_stats(torch.tensor([1e-4] * 2 + [1.0] * 8)), 0.6) is None
    w = not_sparse_warning(gamma_stats(torch.tensor([1e-4] * 1 + [1.0] * 19)), 0.6)
    assert "do not look sparsity-trained: only 5.0%" in w
    m = Model(tiny_cfg())  # fresh BNs: every gamma is 1
    with pytest.raises(UserError, match="every prunable BatchNorm |gamma| is 1"):
        slim_plan(channel_groups(m), m.state_dict(), 0.5)
    with pytest.raises(UserError, match="no prunable channel group has a BatchNorm"):
        slim_plan(channel_groups(m).exclude("model"), m.state_dict(), 0.5)


def test_coupled_group_keeps_the_same_channels_in_every_bn():
    torch.manual_seed(1)
    m = Model(tiny_cfg()).eval()
    for bn in bn_modules(m).values():
        bn.weight.data.uniform_(0.05, 1.0)
    cg = channel_groups(m)
    g = cg.by_name["model.4.cv1"]
    members = [k for k in g.producers if k.endswith(".bn.weight")]
    assert len(members) == 3  # cv1 + the residual outputs of both bottlenecks
    sd = m.state_dict()
    sp = slim_plan(cg, sd, 0.5)
    idx = sp.plan["model.4.cv1"]
    k = len(idx)
    mean = torch.stack([sd[key].abs() for key in members]).mean(0)
    assert torch.allclose(channel_scores(cg, sd)["model.4.cv1"], mean)
    assert torch.equal(idx, mean.argsort(descending=True)[:k].sort().values)
    # a per-BN choice would have differed: the group is ranked as one unit
    assert any(not torch.equal(sd[key].abs().argsort(descending=True)[:k].sort().values, idx) for key in members)
    pruned = apply_plan_to_model(m, sp.plan, cg).state_dict()
    for key in members:
        assert torch.equal(pruned[key], sd[key][idx]), key
        base = key.removesuffix("weight")
        assert torch.equal(pruned[base + "running_mean"], sd[base + "running_mean"][idx])


# ------------------------------------------------------------------------------------ CLI
def test_cli_sparsity_train_slim_finetune(tmp_path, synth_data, tiny_cfg_file, capsys):
    common = ["--data", str(synth_data), "--imgsz", "64", "--batch", "16", "--workers", "0"]
    t, s, ft = tmp_path / "sparse", tmp_path / "slim", tmp_path / "ft"
    assert main(["train", "--cfg", str(tiny_cfg_file), "--epochs", "1", "--sparsity", "1e-2",
                 "--sparsity-schedule", "cosine-decay", "--out", str(t), *common]) == 0
    out = capsys.readouterr().out
    assert "sparsity 0.01: " in out and "prunable BN |gamma| < 1e-2" in out
    header, row = (t / "results.csv").read_text().splitlines()[:2]
    rec = dict(zip(header.split(","), row.split(",")))
    assert float(rec["sparsity"]) == 0.01 and 0 <= float(rec["gamma_lt_1e-2"]) <= 1 and "gamma_lt_1e-3" in rec
    assert (t / "gamma_hist.png").read_bytes()[:4] == b"\x89PNG"
    extra = yaml.safe_load((t / "opt.yaml").read_text())["extra"]
    assert extra == {"sparsity": 0.01, "sparsity_schedule": "cosine-decay", "sparsity_warmup_epochs": 0,
                     "sparsity_exclude": []}
    assert json.loads((t / "report.json").read_text())["sparsity"]["last_epoch"]["n"] > 0

    assert main(["slim", "--weights", str(t), "--global-percent", "0.5", "--bn-batches", "1",
                 "--eval-batches", "1", "--out", str(s), *common]) == 0
    cap = capsys.readouterr()
    out = cap.out
    assert "warning: the weights do not look sparsity-trained" in cap.err  # 1 epoch: gammas are still near 1
    assert "GFLOPs before" in out and "after BN recalibration" in out and f"wrote {s}" in out
    rep = json.loads((s / "report.json").read_text())
    for key in ("threshold", "channels_removed", "flops_ratio", "params_ratio", "gflops_before", "gflops",
                "params_before", "params", "map_before", "map_pruned", "map_recalibrated", "map50", "map",
                "warnings", "held_at_minimum", "groups", "layers"):
        assert key in rep, key
    assert rep["stage"] == "slim" and rep["parent"] == str(t)
    assert set(rep["map_pruned"]) == {"map50", "map"} and rep["map50"] == rep["map_recalibrated"]["map50"]
    assert 0.4 < rep["channels_removed"] < 0.6 and rep["flops_ratio"] < 1 and rep["params_ratio"] < 1
    assert any("sparsity-trained" in w for w in rep["warnings"])
    assert (s / "channels.png").read_bytes()[:4] == b"\x89PNG"
    slimmed = load_model(s)
    assert rep["params"] == sum(p.numel() for p in slimmed.parameters())
    assert slimmed.model[4].cv1.conv.out_channels == rep["groups"]["model.4.cv1"]["kept"]

    assert main(["train", "--weights", str(s), "--epochs", "1", "--out", str(ft), *common]) == 0
    fine = load_model(ft)
    assert json.loads((ft / "report.json").read_text())["parent"] == str(s)
    assert {k: v.shape for k, v in fine.state_dict().items()} == {k: v.shape for k, v in slimmed.state_dict().items()}


def test_resume_rebuilds_the_sparsity_callback(tmp_path, monkeypatch, synth_data, tiny_cfg_file):
    import compress.engine.trainer as trainer

    run = tmp_path / "run"
    got = {}

    def fake_train(opts, cbs, **kw):  # what a finished run leaves behind, so that --resume finds it
        got.setdefault("train", cbs)
        (run / "last").mkdir(parents=True, exist_ok=True)
        (run / "last" / trainer.STATE).write_bytes(b"")
        return {"stage": "train"}

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(trainer, "resume", lambda d, cbs, **kw: got.setdefault("resume", cbs) and {"stage": "train"})
    assert main(["train", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), "--sparsity", "2e-3",
                 "--sparsity-warmup-epochs", "3", "--exclude", "0", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    a, b = got["train"][0], got["resume"][0]
    assert isinstance(b, SparsityCallback) and b.options() == a.options()
    assert b.options() == {"sparsity": 2e-3, "sparsity_schedule": "constant", "sparsity_warmup_epochs": 3,
                           "sparsity_exclude": ["0"]}
    got.clear()
    assert main(["train", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), "--out", str(tmp_path / "p")]) == 0
    assert got["train"] == []  # no --sparsity, no callback


@pytest.fixture(scope="module")
def gamma_artifact(tmp_path_factory):
    torch.manual_seed(0)
    m = Model(tiny_cfg())
    for bn in bn_modules(m).values():
        bn.weight.data.uniform_(0.0, 1.0)
    root = tmp_path_factory.mktemp("slimart")
    fresh = save_model(Model(tiny_cfg()), root / "fresh")
    return save_model(m, root / "art"), fresh


@pytest.mark.parametrize("args,msg", [
    (["--global-percent", "1"], "--global-percent 1.0: must be in [0, 1)"),
    (["--global-percent", "-0.2"], "--global-percent -0.2: must be in [0, 1)"),
    (["--global-percent", "0.5", "--eval-batches", "x"], "--eval-batches x: give a positive number"),
    (["--global-percent", "0.5", "--round-to", "0"], "--round-to 0: must be a positive integer"),
    (["--global-percent", "0.5", "--exclude", "99"], "--exclude 99: matches no prunable channel group"),
    (["--global-percent", "0.5", "--exclude", "model"], "no prunable channel group has a BatchNorm"),
    (["--global-percent", "0.5", "FRESH"], "never trained"),
    (["--global-percent", "0.5", "--imgsz", "50"], "--imgsz 50 must be a positive multiple"),
])
def test_slim_bad_input_is_one_line_exit_2(tmp_path, synth_data, gamma_artifact, capsys, args, msg):
    art, fresh = gamma_artifact
    weights = fresh if "FRESH" in args else art
    args = [a for a in args if a != "FRESH"]
    rc = main(["slim", "--weights", str(weights), "--data", str(synth_data), "--imgsz", "64", "--workers", "0",
               "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("compress slim: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,msg", [
    (["--sparsity", "-1"], "--sparsity -1.0: must be a non-negative number"),
    (["--sparsity-schedule", "cosine-decay"], "--sparsity-schedule only applies to sparsity training"),
    (["--exclude", "0"], "--exclude only applies to sparsity training"),
    (["--sparsity", "1e-3", "--sparsity-warmup-epochs", "-1"], "--sparsity-warmup-epochs -1: must be >= 0"),
])
def test_train_sparsity_bad_input(tmp_path, synth_data, tiny_cfg_file, capsys, args, msg):
    rc = main(["train", "--cfg", str(tiny_cfg_file), "--data", str(synth_data), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
