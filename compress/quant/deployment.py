"""Deploy a QAT-prepared YOLOv5 model to a backend's files, and run the resulting ONNX in onnxruntime.

:func:`deploy` wraps ``mqbench.convert_deploy``: it exports the fake-quantized model, lets MQBench fold
BatchNorm, strip the fake quantizers and write the backend's range file, and (Tensorrt) the Q/DQ ONNX, all
in a scratch directory that is moved into place only when every step succeeded.
:class:`OnnxDetector` runs a deployed ONNX file (the int8 Q/DQ model a TensorRT user ships, or a float
deploy model) and returns decoded predictions like the float model's eval output.
"""
from __future__ import annotations

import operator
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from . import mqbench_compat
from .backends import Backend
from .qat import detect_head, pbp, resolve_backend

FAKEQUANT_ONNX, QDQ_ONNX = "{}.onnx", "{}_qdq.onnx"
_QDQ_FIXED_NAME = "onnx_quantized_model.onnx"  # mqbench/deploy/deploy_onnx_qlinear.py
INPUT_NAME = "images"
OUTPUT_NAME = "output0"


def deploy_graph(prepared, head: str = "decoded"):
    """An eval-mode copy of the prepared graph returning only the decoded predictions (``head="decoded"``)
    or only the raw per-level outputs (``head="raw"``): the model MQBench's deploy steps export."""
    from mqbench.utils import deepcopy_graphmodule

    gm = deepcopy_graphmodule(prepared)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    det = out.args[0]
    with gm.graph.inserting_before(out):
        sel = gm.graph.call_function(operator.getitem, (det, 0 if head == "decoded" else 1))
    out.args = (sel,)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def deploy(prepared, backend: str | Backend, out_dir, imgsz, name: str = "model", head: str = "decoded") -> dict:
    """Write ``backend``'s deploy files for a calibrated/trained prepared model into ``out_dir``.

    ``imgsz`` is an int or (height, width); the batch size is 1. ``head="decoded"`` exports the decoded
    predictions (one output ``output0``, (1, anchors*cells, 5+nc), as the float model's eval output),
    ``head="raw"`` the per-level head outputs. Returns ``{role: path}`` with roles ``fakequant_onnx``
    (MQBench's ONNX with custom fake-quant ops), ``deploy_onnx`` (float ONNX, BN folded, weights
    clipped; NNIE writes Resize as Upsample), ``params`` (NNIE ``*_gfpq_param_dict.json``, Tensorrt and
    others ``*_clip_ranges.json``) and, for Tensorrt, ``qdq_onnx`` (QuantizeLinear/DequantizeLinear int8
    model). Nothing is left in ``out_dir`` if a step fails.
    """
    backend = resolve_backend(backend)
    if getattr(prepared, "qat_backend", backend.name) != backend.name:
        raise UserError(f"--backend {backend.name}: the model was prepared for {prepared.qat_backend}")
    if head not in ("decoded", "raw"):
        raise ValueError(f"head must be 'decoded' or 'raw', got {head!r}")
    if "onnxsim" in backend.requires:
        _require_onnxsim()
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    mqbench_compat.apply()
    from mqbench.convert_deploy import convert_deploy

    # Absolute paths: MQBench joins output_path with its file names, and the process's working directory
    # is never changed (a relative --out used to be resolved twice and crash).
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qat-deploy-", dir=out))
    try:
        model = deploy_graph(prepared, head)
        outputs = [OUTPUT_NAME] if head == "decoded" else [f"output{i}" for i in range(detect_head(prepared).nl)]
        convert_deploy(model, pbp.BackendType[backend.name], {INPUT_NAME: [1, 3, h, w]}, output_path=str(tmp),
                       model_name=name, deploy_to_qlinear=backend.qdq_onnx, output_names=outputs)
        if (tmp / _QDQ_FIXED_NAME).is_file():
            os.replace(tmp / _QDQ_FIXED_NAME, tmp / QDQ_ONNX.format(name))
        roles = {"fakequant_onnx": FAKEQUANT_ONNX, "deploy_onnx": backend.deploy_onnx, "params": backend.params_file,
                 "qdq_onnx": QDQ_ONNX}
        written = {}
        for role, pat in roles.items():
            if (tmp / pat.format(name)).is_file():
                written[role] = out / pat.format(name)
        for f in sorted(tmp.iterdir()):  # anything else MQBench wrote (kept, never lost)
            if f.is_file() and f.name not in {p.name for p in written.values()}:
                written[f.name] = out / f.name
        for p in written.values():
            os.replace(tmp / p.name, p)
        return written
    except UserError:
        raise
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RuntimeError(f"MQBench deploy for {backend.name} failed: {msg}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _require_onnxsim():
    try:
        import onnxsim  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("--backend Tengine_u8: its deploy step needs the onnxsim package "
                        "(pip install onnxsim)") from None
    import mqbench.deploy.deploy_tengine as dt

    dt.simplify = onnxsim.simplify  # MQBench binds it only if onnxsim was importable at its import


def upsample_to_resize(model) -> int:
    """Rewrite opset-9 ``Upsample`` nodes (NNIE's deploy model) as ``Resize`` so onnxruntime runs them.

    Nearest upsampling with integer scales, as torch exports ``nn.Upsample``. Returns the number of nodes
    rewritten; the model is changed in place.
    """
    import onnx

    n = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Upsample":
            continue
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        resize = onnx.helper.make_node("Resize", [node.input[0], "", node.input[1]], list(node.output),
                                       name=node.name, mode=mode, coordinate_transformation_mode="asymmetric",
                                       nearest_mode="floor")
        model.graph.node.remove(node)
        model.graph.node.insert(i, resize)
        n += 1
    return n


class OnnxDetector:
    """A deployed YOLOv5 ONNX file in onnxruntime: ``det(images) -> decoded predictions``.

    ``images`` is a float tensor (B, 3, H, W) in 0-1; the result is a tensor (B, anchors*cells, 5+nc), xywh
    in input pixels, like the float model's eval output ``[0]`` -- so an instance is a ``predict`` function
    for ``compress.engine.validate.evaluate`` (mAP of the ONNX file). A file exported with batch size 1 is
    run image by image; H and W must be the export size. NNIE's Upsample nodes are mapped back to Resize in
    memory (the file is not changed).
    """

    def __init__(self, path, threads: int | None = None):
        import onnx

        from ..export import ort_session

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such ONNX file")
        model = onnx.load(str(self.path))
        upsample_to_resize(model)
        self.session = ort_session(model.SerializeToString(), threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.input_hw = tuple(inp.shape[2:4]) if all(isinstance(d, int) for d in inp.shape[2:4]) else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded predictions (the first model output) for a batch of images."""
        if self.input_hw is not None and tuple(images.shape[2:]) != self.input_hw:
            raise ValueError(f"{self.path.name} takes {self.input_hw[0]}x{self.input_hw[1]} images, "
                             f"got {images.shape[2]}x{images.shape[3]} (export at the size you validate at)")
        x = images.detach().float().cpu().numpy()
        step = self.fixed_batch or len(x)
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + step])})[0]
                for i in range(0, len(x), step)]
        return torch.from_numpy(np.concatenate(outs, 0))


@torch.no_grad()
def onnx_vs_torch(onnx_path, prepared, images: torch.Tensor):
    """Decoded predictions for ``images`` from the prepared (fake-quantized) torch model and from an ONNX
    file in onnxruntime, as ``(torch_out, onnx_out)``."""
    was_training = prepared.training
    try:
        ref = prepared.eval()(images.to(next(prepared.parameters()).device))[0].float().cpu()
    finally:
        prepared.train(was_training)
    got = OnnxDetector(onnx_path)(images)
    if got.shape != ref.shape:
        raise RuntimeError(f"{onnx_path}: output shape {tuple(got.shape)} != torch {tuple(ref.shape)}")
    return ref, got


def check_qdq_onnx(onnx_path, prepared, images: torch.Tensor) -> float:
    """Max absolute difference between an ONNX file in onnxruntime and the fake-quantized torch model.

    For the Tensorrt Q/DQ file this measures how faithfully the int8 model a user ships reproduces the
    model that was trained and validated. The two agree to float rounding except where a value sits on a
    rounding tie (torch multiplies by 1/scale, onnxruntime divides by scale): one step flips there and can
    spread through later layers, much more in an untrained model than in a trained one.
    """
    ref, got = onnx_vs_torch(onnx_path, prepared, images)
    return float((got - ref).abs().max())
