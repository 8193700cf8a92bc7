"""CLI of the foundation: info, export (ONNX parity), artifacts, and one-line errors for bad input."""
import subprocess
import sys

import pytest
import torch

import compress
from compress.cli import main
from compress.errors import UserError
from compress.export import export_onnx, onnx_parity

from conftest import tiny_cfg


def run_cli(*args):
    """Run the real console entry point in a subprocess; returns (rc, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "compress.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def artifact(tmp_path):
    torch.manual_seed(0)
    m = compress.load_model(tiny_cfg())
    return compress.save_model(m, tmp_path / "art", report={"stage": "test"})


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert compress.__version__ in capsys.readouterr().out
    rc, out, _ = run_cli("--help")
    for cmd in ("info", "train", "val", "export"):
        assert cmd in out


def test_public_api_round_trip(artifact):
    m = compress.load_model(artifact)
    assert (artifact / "model.yaml").is_file() and (artifact / "report.json").is_file()
    sd = torch.load(artifact / "weights.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    prof = compress.profile(m, 64)
    assert prof["params"] == sum(p.numel() for p in m.parameters()) and prof["gflops"] > 0
    m2 = compress.load_model(artifact / "model.yaml", artifact / "weights.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_info_cli(artifact):
    rc, out, err = run_cli("info", "--weights", artifact, "--imgsz", 64)
    assert rc == 0, err
    assert "Detect" in out and "GFLOPs" in out and f"{compress.profile(compress.load_model(artifact), 64)['params']:,}" in out


@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_export_parity(artifact, tmp_path, dynamic):
    m = compress.load_model(artifact)
    path = export_onnx(m, tmp_path / "m.onnx", 96, dynamic=dynamic)
    assert onnx_parity(m, path, 96) < 1e-4
    if dynamic:
        assert onnx_parity(m, path, 64, batch=2) < 1e-4


def test_export_cli(artifact):
    rc, out, err = run_cli("export", "--weights", artifact, "--imgsz", 64)
    assert rc == 0, err
    assert (artifact / "model.onnx").is_file() and "max abs diff" in out


def test_bad_inputs_give_one_line_and_exit_2(artifact, tmp_path):
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes((artifact / "weights.pt").read_bytes()[:300])
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    cases = [
        ("info", "--cfg", "no-such.yaml"),
        ("info", "--weights", artifact, "--imgsz", 100),
        ("info", "--cfg", "yolov5n", "--weights", artifact / "weights.pt"),  # shapes do not match
        ("info", "--cfg", tiny_cfg_file(tmp_path), "--weights", trunc),
        ("info", "--cfg", tiny_cfg_file(tmp_path), "--weights", text),
        ("export", "--weights", tmp_path / "missing"),
    ]
    for args in cases:
        rc, out, err = run_cli(*args)
        assert rc == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    rc, _, err = run_cli("info", "--cfg", "yolov5n", "--weights", artifact / "weights.pt")
    assert "model.0.conv.weight" in err and "(8, 3, 6, 6)" in err


def tiny_cfg_file(tmp_path):
    import yaml

    f = tmp_path / "tiny.yaml"
    d = tiny_cfg()
    d.pop("yaml_file")
    f.write_text(yaml.safe_dump(d))
    return f


def test_save_model_is_atomic_on_failure(tmp_path, monkeypatch):
    m = compress.load_model(tiny_cfg())
    out = tmp_path / "a"
    import compress.model.artifact as art

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(art, "write_yaml", boom)
    with pytest.raises(RuntimeError):
        compress.save_model(m, out)
    # weights were written whole or not at all; no temp files are left behind
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "report.json").exists()


def test_user_error_for_weights_shape_mismatch(artifact):
    with pytest.raises(UserError, match="model.0.conv.weight"):
        compress.load_model("yolov5s.yaml", artifact / "weights.pt")
