"""The ``export`` stage: ONNX with decoded outputs, checked against torch in onnxruntime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckFailed, UserError
from ..fileio import check_output_file
from ..options import ModelInput, option
from .base import Report, load_input_model, source_name

MIN_OPSET = 9  # nearest Upsample exports as Resize/Upsample from opset 9 on
PARITY = 1e-4  # max abs difference, boxes in units of the image size, scores as they are
# onnxruntime must be as close to the exact (float64) result as PARITY plus twice torch's own float32 error
NOISE_FACTOR = 2


def max_opset() -> int:
    """The newest ONNX opset the installed torch exporter writes."""
    from torch.onnx import _constants

    return int(_constants.ONNX_MAX_OPSET)


@dataclass(kw_only=True)
class ExportOptions(ModelInput):
    """What ``compress export`` takes."""

    format: str = option("onnx", "export format", choices=("onnx",))
    dynamic: bool = option(False, "dynamic batch and image size axes")
    opset: int = option(17, "ONNX opset")
    out: str | None = option(None, "output .onnx file", default_help="RUN_DIR/model.onnx for an artifact, "
                                                                     "X.onnx beside any other weights", recipe=False)

    def check(self):
        super().check()
        hi = max_opset()
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= hi:
            raise UserError(f"--opset {self.opset}: must be in {MIN_OPSET}..{hi} (the opsets this torch "
                                   f"exports YOLOv5 to)")
        if not self.weights and not self.cfg:
            raise UserError("give --weights (artifact dir or .pt) or --cfg")


def default_onnx_path(weights) -> Path:
    """``RUN_DIR/model.onnx`` for an artifact, ``X.onnx`` beside any other weights file."""
    p = Path(weights)
    return p / "model.onnx" if p.is_dir() else p.with_suffix(".onnx")


def run(o: ExportOptions) -> Report:
    """Export, then compare onnxruntime with torch; CheckFailed (exit 1) when onnxruntime is further from the
    exact (float64) result than 1e-4 plus twice torch's own float32 error."""
    from ..export import export_onnx, parity_report
    from ..model.profile import profile

    o.validate()
    model = load_input_model(o)
    imgsz = o.resolved_imgsz()
    name = o.cfg.get("yaml_file", "model") if isinstance(o.cfg, dict) else o.cfg
    out = check_output_file(o.out or default_onnx_path(o.weights or Path(str(name)).stem))
    export_onnx(model, out, imgsz, dynamic=o.dynamic, opset=o.opset)
    par = parity_report(model, out, imgsz)
    diff, noise = par["max_abs_diff"], par["torch_vs_float64"]
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB); onnxruntime vs torch max abs diff {diff:.2e} "
          f"(boxes / imgsz, scores; torch float32 vs float64 {noise:.2e})")
    prof = profile(model, imgsz)
    rep = Report(stage="export", params=prof["params"], gflops=prof["gflops"], imgsz=imgsz, parent=source_name(o),
                 options=o.to_dict() | {"imgsz": imgsz}, details={"onnx": str(out), **par})
    tol = PARITY + NOISE_FACTOR * noise
    if par["ort_vs_float64"] > tol:
        raise CheckFailed(f"{out}: onnxruntime differs from the exact (float64) result by "
                          f"{par['ort_vs_float64']:.2e}, more than {tol:.2e} ({PARITY:g} + {NOISE_FACTOR} x torch's "
                          f"own float32 error {noise:.2e})")
    return rep
