"""Each mqbench-torch2 compatibility fix: the MQBench step it concerns fails without it and works with it.

The expensive part (tracing + ONNX export of a tiny calibrated model) is done once per backend; each
deploy pass is then run on a copy of the exported file, with and without the fix.
"""
from __future__ import annotations

import os
import shutil
import stat
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_quant import IMGSZ, float_model, images, single_thread  # noqa: F401 (autouse fixture)

from compress.quant import calibrate, deploy_graph, mqbench_compat, prepare_qat

SHAPE = {"images": [1, 3, IMGSZ // 2, IMGSZ // 2]}  # exported at 32 px: the smallest input, the fastest export


def calibrated(backend):
    p = prepare_qat(float_model(), backend)
    calibrate(p, [images(1)])
    return p


def export_model(prepared):
    """The graph MQBench's deploy hands to ``convert_onnx``: head selected, BatchNorm folded."""
    from mqbench.convert_deploy import convert_merge_bn

    gm = deploy_graph(prepared)
    convert_merge_bn(gm)
    return gm


def fake_polygraphy(bin_dir, marker):
    """A `polygraphy` executable that only records that it was run."""
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "polygraphy"
    exe.write_text(f"#!/bin/sh\necho \"$@\" > '{marker}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.fixture(scope="module")
def trt(tmp_path_factory):
    """A calibrated Tensorrt model and its fake-quant ONNX: raw export, cleaned, and half-cleaned copies."""
    d = tmp_path_factory.mktemp("compat-trt")
    marker = d / "polygraphy-ran"
    fake_polygraphy(d / "bin", marker)
    prepared = calibrated("Tensorrt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{d / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        mqbench_compat.export_legacy(export_model(prepared), SHAPE, None, str(d / "raw.onnx"))
        shutil.copy(d / "raw.onnx", d / "clean.onnx")
        mqbench_compat.clean_exported_onnx(str(d / "clean.onnx"))
    raw = onnx.load(str(d / "raw.onnx"))
    half_cleaned = (("no_drop", mqbench_compat.unshare_constants),
                    ("no_unshare", mqbench_compat.drop_initializer_inputs))
    for name, keep in half_cleaned:
        m = onnx.ModelProto()
        m.CopyFrom(raw)
        keep(m)
        onnx.save(m, str(d / f"{name}.onnx"))
    return SimpleNamespace(dir=d, prepared=prepared, marker=marker)


def work_copy(trt, variant, tmp_path, name="model"):
    dst = tmp_path / f"{name}.onnx"
    shutil.copy(trt.dir / f"{variant}.onnx", dst)
    return str(dst)


def root_cause(e):
    while e.__cause__ is not None:
        e = e.__cause__
    return e


# --------------------------------------------------------------------------------- the switchboard
def test_apply_is_idempotent_and_fixes_can_be_held_off():
    mqbench_compat.apply()
    from mqbench.custom_quantizer import model_quantizer
    from mqbench.deploy.deploy_linear import LinearQuantizer_process

    assert mqbench_compat.applied() == mqbench_compat.FIXES
    patched = (model_quantizer.fuse_fx, vars(LinearQuantizer_process)["parse_qparams"])
    mqbench_compat.apply()
    assert (model_quantizer.fuse_fx, vars(LinearQuantizer_process)["parse_qparams"]) == patched
    try:
        with mqbench_compat.without("numpy2_qparams", "fuse_fx_qat"):
            mqbench_compat.apply()  # what prepare_qat/deploy call: must not re-install held-off fixes
            assert model_quantizer.fuse_fx is torch.ao.quantization.quantize_fx.fuse_fx
            assert vars(LinearQuantizer_process)["parse_qparams"] is not patched[1]
            assert "numpy2_qparams" not in mqbench_compat.applied()
        assert mqbench_compat.applied() == mqbench_compat.FIXES
        mqbench_compat.revert()
        assert mqbench_compat.applied() == ()
        assert model_quantizer.fuse_fx is torch.ao.quantization.quantize_fx.fuse_fx
    finally:
        mqbench_compat.apply()
    with pytest.raises(KeyError, match="unknown MQBench fix"):
        mqbench_compat.apply(["no_such_fix"])


# --------------------------------------------------------------------------------- 1. fusion
@pytest.mark.filterwarnings("ignore:Passing a fuse_custom_config_dict")  # torch's own fuse_fx, unfixed
def test_fuse_fx_qat_lets_train_mode_models_fuse():
    with mqbench_compat.without("fuse_fx_qat"):
        with pytest.raises(RuntimeError, match="Fusion only for eval"):
            prepare_qat(float_model(), "Tensorrt")
    p = prepare_qat(float_model(), "Tensorrt")
    convbn = [m for m in p.modules() if isinstance(m, torch.ao.nn.intrinsic.qat.ConvBn2d)]
    assert convbn and all(m.training and m.bn.training for m in convbn)  # trains on batch statistics


# --------------------------------------------------------------------------------- 2. symbolics
def test_nnie_symbolic_keeps_shape_for_export(tmp_path):
    gm = export_model(calibrated("NNIE"))
    with mqbench_compat.without("symbolic_shapes"):
        with pytest.raises(Exception, match="kernel of unknown shape"):
            mqbench_compat.export_legacy(gm, SHAPE, None, str(tmp_path / "bad.onnx"))
    mqbench_compat.export_legacy(gm, SHAPE, None, str(tmp_path / "ok.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "ok.onnx")).graph.node]
    assert "NNIEQuantize" in ops


class _Value:
    def __init__(self, typ=None):
        self.typ, self.set_to = typ, None

    def type(self):
        return self.typ

    def setType(self, t):  # noqa: N802 (torch's name)
        self.set_to = t


class _Graph:
    def op(self, name, *args, **kwargs):
        return _Value()


def test_vitis_symbolic_output_gets_input_type():
    from mqbench.fake_quantize.tqt import FakeQuantizeTqtAffine

    x = _Value(typ="Float(1, 8, 16, 16)")
    with mqbench_compat.without("symbolic_shapes"):
        assert FakeQuantizeTqtAffine.symbolic(_Graph(), x, None, None, -128, 127, 2).set_to is None
    assert FakeQuantizeTqtAffine.symbolic(_Graph(), x, None, None, -128, 127, 2).set_to == x.typ


# --------------------------------------------------------------------------------- 3. ONNX export
def test_export_needs_the_legacy_exporter(tmp_path, trt, monkeypatch):
    monkeypatch.delitem(mqbench_compat.EXPORT_KWARGS, "dynamo")  # torch's default: the dynamo exporter
    path = tmp_path / "dynamo.onnx"
    try:
        import onnxscript  # noqa: F401
    except ModuleNotFoundError:  # this machine: the dynamo exporter cannot run at all
        with pytest.raises(ModuleNotFoundError, match="onnxscript"):
            mqbench_compat.export_legacy(export_model(trt.prepared), SHAPE, None, str(path))
        return
    mqbench_compat.export_legacy(export_model(trt.prepared), SHAPE, None, str(path))
    # where it exports, it ignores MQBench's symbolics: no fake-quantize ops left for the deploy passes
    assert not any(n.domain == "mqbench_custom" for n in onnx.load(str(path)).graph.node)


def test_export_keeps_initializers_as_inputs(tmp_path, trt, monkeypatch):
    from mqbench.deploy import remove_fakequantize_and_collect_params

    monkeypatch.setitem(mqbench_compat.EXPORT_KWARGS, "keep_initializers_as_inputs", False)
    path = str(tmp_path / "model.onnx")
    mqbench_compat.export_legacy(export_model(trt.prepared), SHAPE, None, path)
    mqbench_compat.clean_exported_onnx(path)
    with pytest.raises(KeyError, match="zero_point"):  # equal zero points were merged into Identity nodes
        remove_fakequantize_and_collect_params(path, "model", backend="tensorrt")
    remove_fakequantize_and_collect_params(work_copy(trt, "clean", tmp_path, "ok"), "ok", backend="tensorrt")


def test_export_without_autograd_inlining_for_vitis(tmp_path, monkeypatch):
    gm = export_model(calibrated("Vitis"))
    with monkeypatch.context() as mp:
        mp.setitem(mqbench_compat.EXPORT_KWARGS, "autograd_inlining", True)
        with pytest.raises(IndexError, match="not in the map"):
            mqbench_compat.export_legacy(gm, SHAPE, None, str(tmp_path / "bad.onnx"))
    mqbench_compat.export_legacy(gm, SHAPE, None, str(tmp_path / "ok.onnx"))
    assert "FakeQuantizeTqtAffine" in [n.op_type for n in onnx.load(str(tmp_path / "ok.onnx")).graph.node]


def test_shared_constants_are_split(tmp_path, trt):
    from mqbench.deploy import remove_fakequantize_and_collect_params

    with pytest.raises(ValueError, match="not in container"):
        remove_fakequantize_and_collect_params(work_copy(trt, "no_unshare", tmp_path), "model", backend="tensorrt")
    path = work_copy(trt, "clean", tmp_path, "ok")
    remove_fakequantize_and_collect_params(path, "ok", backend="tensorrt")
    assert (tmp_path / "ok_deploy_model.onnx").is_file()


def run_qdq_pass(path):
    """MQBench's Tensorrt Q/DQ pass; returns an onnxruntime session on the file it writes."""
    from mqbench.deploy import ONNXQLinearPass

    ONNXQLinearPass(path).run()
    qdq = os.path.join(os.path.dirname(path), "onnx_quantized_model.onnx")
    return ort.InferenceSession(qdq, providers=["CPUExecutionProvider"])


def test_initializer_inputs_are_dropped(tmp_path, trt):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(Exception, match="element type tensor\\(int8\\)"):
        run_qdq_pass(work_copy(trt, "no_drop", tmp_path / "a"))
    sess = run_qdq_pass(work_copy(trt, "clean", tmp_path / "b"))
    assert [i.name for i in sess.get_inputs()] == ["images"]
    out = sess.run(None, {"images": images(1)[..., :IMGSZ // 2, :IMGSZ // 2].numpy()})[0]
    assert out.shape == (1, 63, 9) and np.isfinite(out).all()


@pytest.mark.filterwarnings("ignore")  # MQBench's own export, with the legacy exporter's warnings
def test_polygraphy_is_never_run(tmp_path, trt, monkeypatch):
    import mqbench.convert_deploy as cd

    # our export ran (in the fixture) with a polygraphy on PATH and did not call it
    assert not trt.marker.exists()
    # MQBench's own convert_onnx, even with a working exporter, shells out to it
    real_export = torch.onnx.export

    def legacy_export(*args, **kwargs):
        kwargs.update(mqbench_compat.EXPORT_KWARGS)
        return real_export(*args, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", legacy_export)
    monkeypatch.setenv("PATH", f"{trt.dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    assert cd.convert_onnx is not mqbench_compat.convert_onnx  # the fix swaps the registry entries only
    cd.convert_onnx(export_model(trt.prepared), SHAPE, None, str(tmp_path / "mq.onnx"))
    assert trt.marker.exists() and "sanitize" in trt.marker.read_text()


# --------------------------------------------------------------------------------- 4. NumPy 2
def test_per_tensor_qparams_are_scalars_for_numpy2(tmp_path, trt):
    import json

    from mqbench.deploy import remove_fakequantize_and_collect_params

    with mqbench_compat.without("numpy2_qparams"):
        with pytest.raises(TypeError, match="0-dimensional arrays"):
            remove_fakequantize_and_collect_params(work_copy(trt, "clean", tmp_path), "model", backend="tensorrt")
    remove_fakequantize_and_collect_params(work_copy(trt, "clean", tmp_path), "model", backend="tensorrt")
    ranges = json.loads((tmp_path / "model_clip_ranges.json").read_text())["tensorrt"]["blob_range"]
    assert "images" in ranges and all(isinstance(v, float) and v > 0 for v in ranges.values())


# --------------------------------------------------------------------------------- 5. Q/DQ sort
def test_qlinear_sort_accepts_resize_empty_input(tmp_path, trt):
    assert any(n.op_type == "Resize" and "" in n.input for n in onnx.load(str(trt.dir / "clean.onnx")).graph.node)
    with mqbench_compat.without("qlinear_toposort"):
        with pytest.raises(AssertionError, match="Graph is illegel"):
            run_qdq_pass(work_copy(trt, "clean", tmp_path))
    (tmp_path / "ok").mkdir()
    sess = run_qdq_pass(work_copy(trt, "clean", tmp_path / "ok"))
    assert not any(i.name == "" for i in sess.get_inputs())


# --------------------------------------------------------------------------------- 6. out2node
def test_tengine_clip_ranges_get_out2node(tmp_path, trt, monkeypatch):
    import mqbench.deploy.deploy_tengine as dt

    # onnxsim is not installed here; its graph simplification is not what this fix is about
    monkeypatch.setattr(dt, "simplify", lambda model: (model, True), raising=False)
    with mqbench_compat.without("clip_ranges_out2node"):
        with pytest.raises(TypeError, match="out2node"):
            dt.remove_fakequantize_and_collect_params_tengine(work_copy(trt, "clean", tmp_path), "model")
    dt.remove_fakequantize_and_collect_params_tengine(work_copy(trt, "clean", tmp_path), "model")
    lines = (tmp_path / "model_for_tengine.scale").read_text().splitlines()
    assert lines and all(len(line.split()) == 3 for line in lines)
