"""compress qat end to end from the CLI: NNIE and Tensorrt deploy files, int8 check, pruned input, bad input."""
import json
import subprocess
import sys

import pytest
import torch

import compress
from compress.quant.qat import float_state_dict, prepare_qat

from conftest import tiny_cfg


def cli(*args):
    return subprocess.run([sys.executable, "-m", "compress.cli", *map(str, args)], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_data, tiny_cfg_file):
    out = tmp_path_factory.mktemp("qat") / "base"
    p = cli("train", "--cfg", tiny_cfg_file, "--data", synth_data, "--epochs", 1, "--imgsz", 64, "--batch", 8,
            "--workers", 0, "--out", out)
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.parametrize("backend,files", [
    ("Tensorrt", ["model_deploy_model.onnx", "model_clip_ranges.json", "model_qdq.onnx"]),
    ("NNIE", ["model_deploy_model.onnx", "model_gfpq_param_dict.json"]),
])
def test_qat_cli_writes_deploy_files_and_an_artifact(trained, synth_data, tmp_path, backend, files):
    out = tmp_path / backend
    p = cli("qat", "--weights", trained, "--data", synth_data, "--backend", backend, "--epochs", 1,
            "--imgsz", 64, "--batch", 4, "--calib-batches", 2, "--workers", 0, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in files:
        assert (out / "deploy" / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["stage"] == "qat" and rep["backend"] == backend and "ptq_map50" in rep["qat"]
    if backend == "Tensorrt":
        assert "int8_map50" in rep and rep["latency_ms"] > 0 and rep["qdq_max_abs_diff"] >= 0
    # the QAT output is an ordinary float artifact again (re-trainable, exportable)
    m = compress.load_model(out)
    assert (out / "qat_state.pt").is_file()
    assert not torch.equal(m.state_dict()["model.0.conv.weight"],
                           compress.load_model(trained).state_dict()["model.0.conv.weight"])


def test_float_weights_map_back_exactly():
    torch.manual_seed(0)
    m = compress.load_model(tiny_cfg()).train()
    p = prepare_qat(m, "Tensorrt")
    sd = float_state_dict(p, m)
    assert sd.keys() == m.state_dict().keys()
    assert all(torch.equal(sd[k].float(), v.float()) for k, v in m.state_dict().items())


def test_qat_on_a_pruned_artifact(trained, synth_data, tmp_path):
    pruned = tmp_path / "pruned"
    assert cli("prune", "--weights", trained, "--ratio", 0.4, "--imgsz", 64, "--out", pruned).returncode == 0
    p = cli("qat", "--weights", pruned, "--data", synth_data, "--backend", "tensorrt", "--epochs", 1,
            "--imgsz", 64, "--batch", 4, "--calib-batches", 1, "--workers", 0, "--out", tmp_path / "q")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "q" / "deploy" / "model_qdq.onnx").is_file()


def test_qat_bad_input(trained, synth_data, tmp_path):
    base = ["qat", "--weights", trained, "--data", synth_data, "--imgsz", 64, "--batch", 4, "--epochs", 1,
            "--workers", 0]
    cases = [
        (["--backend", "Hexagon", "--out", tmp_path / "a"], "valid: NNIE, Tensorrt"),
        (["--backend", "ONNX_QNN", "--out", tmp_path / "b"], "SiLU"),
        (["--backend", "NNIE", "--calib-batches", 500, "--out", tmp_path / "c"], "train images asked"),
    ]
    for extra, msg in cases:
        p = cli(*base, *extra)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # weights that are already quantized
    m = compress.load_model(trained).train()
    torch.save(prepare_qat(m, "Tensorrt").state_dict(), tmp_path / "q.pt")
    p = cli("qat", "--cfg", tmp_path / "x", "--weights", tmp_path / "q.pt", "--data", synth_data,
            "--backend", "NNIE", "--out", tmp_path / "d")
    assert p.returncode == 2


def test_one_qat_run_ships_one_model(trained, synth_data, tmp_path, monkeypatch):
    """With the best epoch (1) not the last (2), weights.pt, qat_state.pt, deploy/ and every reported mAP
    describe epoch 1."""
    import compress.engine.trainer as trainer
    from compress.cli import main
    from compress.data.dataset import load_data_yaml
    from compress.engine.validate import evaluate, load_batches, torch_predictor
    from compress.quant import OnnxDetector, load_qat_state, onnx_vs_torch

    scores = iter([1.0, 0.0])  # the trainer's fitness: epoch 1 is the best
    monkeypatch.setattr(trainer, "fitness", lambda res: next(scores))
    out = tmp_path / "q"
    assert main(["qat", "--weights", str(trained), "--data", str(synth_data), "--backend", "Tensorrt", "--epochs",
                 "2", "--imgsz", "64", "--batch", "4", "--calib-batches", "2", "--workers", "0", "--out",
                 str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["best_epoch"] == 1 and rep["final_epoch"] == 2 and rep["epoch"] == 1
    best_state = torch.load(out / "qat_state.pt", weights_only=True)
    last_state = torch.load(out / "last" / "qat_state.pt", weights_only=True)
    assert any(not torch.equal(best_state[k], last_state[k]) for k in best_state)  # epoch 2 did change it

    float_model = compress.load_model(trained)
    best, last = prepare_qat(float_model, "Tensorrt"), prepare_qat(float_model, "Tensorrt")
    load_qat_state(best, out / "qat_state.pt")
    load_qat_state(last, out / "last" / "qat_state.pt")
    # weights.pt: the float weights of the epoch-1 QAT model
    w = torch.load(out / "weights.pt", weights_only=True)
    assert all(torch.equal(w[k], v) for k, v in float_state_dict(best, float_model).items())
    # the fake-quant mAP reported is the epoch-1 model's, on the same val images
    data = load_data_yaml(synth_data)
    val = load_batches(data["val"], 64, 8, None, data["nc"], shuffle=False)
    res = evaluate(torch_predictor(best.eval()), val, data["nc"], data["names"], progress=False)
    assert res["map"] == pytest.approx(rep["qat_map"], abs=1e-12)
    # deploy/: the int8 ONNX is the epoch-1 model, not the last one
    qdq = out / "deploy" / "model_qdq.onnx"
    x = val[0][0].float() / 255
    ref, got = onnx_vs_torch(qdq, best, x)
    ref_last, _ = onnx_vs_torch(qdq, last, x)
    assert float((got - ref).abs().max()) < float((got - ref_last).abs().max())
    int8 = evaluate(OnnxDetector(qdq), val, data["nc"], data["names"], progress=False)
    assert int8["map"] == pytest.approx(rep["int8_map"], abs=1e-12) and rep["map"] == rep["int8_map"]
