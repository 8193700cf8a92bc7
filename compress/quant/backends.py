"""The QAT backends compress supports: one entry per backend, resolved once (no MQBench import here).

Each :class:`Backend` says what MQBench needs to prepare a YOLOv5 model for it, what its deploy step
writes, whether that includes an int8 Q/DQ ONNX that onnxruntime can score, and which extra Python
packages it needs. Code that quantizes reads these fields instead of testing backend names.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Backend:
    """One MQBench backend as compress drives it.

    ``params_file``: the range/parameter file its deploy writes (``{}`` is the model name);
    ``qdq_onnx``: deploy also writes a QuantizeLinear/DequantizeLinear ONNX (scored in onnxruntime);
    ``exclude_output``: the graph output must not be quantized (MQBench would quantize it);
    ``observe_weights``: weight observers stay on after calibration (no learnable weight range);
    ``typed_leaf_weights``: weight quantizers inside leaf modules need their type set by hand;
    ``requires``: extra Python packages the deploy step imports.
    """

    name: str
    deploy_onnx: str = "{}_deploy_model.onnx"
    params_file: str = "{}_clip_ranges.json"
    qdq_onnx: bool = False
    exclude_output: bool = False
    observe_weights: bool = False
    typed_leaf_weights: bool = False
    requires: tuple = ()


# Backends whose full flow (prepare, calibrate, train, deploy) runs on YOLOv5 with mqbench-torch2 0.1.1.
_TABLE = (
    # HiSilicon NNIE: deploy ONNX (Upsample ops) + gfpq_param_dict.json for the NNIE mapper
    Backend("NNIE", params_file="{}_gfpq_param_dict.json", observe_weights=True),
    # TensorRT: deploy ONNX + clip_ranges.json + the int8 Q/DQ ONNX
    Backend("Tensorrt", qdq_onnx=True),
    Backend("SNPE"),
    Backend("PPLW8A16"),
    Backend("Vitis", typed_leaf_weights=True),
    Backend("OPENVINO"),  # its deploy ONNX uses OpenVINO-only fake-quantize ops
    Backend("Tengine_u8", deploy_onnx="{}_for_tengine.onnx", params_file="{}_for_tengine.scale",
            exclude_output=True, requires=("onnxsim",)),
)
BACKENDS = {b.name: b for b in _TABLE}
REFUSED = {
    "ONNX_QNN": "ONNX_QNN cannot deploy YOLOv5: MQBench's QLinear pass assumes every Conv is followed by "
                "ReLU (or nothing), and YOLOv5 convs end in SiLU",
}


def resolve_backend(name) -> Backend:
    """The :class:`Backend` for a name (case-insensitive; a Backend passes through); UserError otherwise."""
    if isinstance(name, Backend):
        return name
    key = str(name).strip().lower()
    for b in _TABLE:
        if b.name.lower() == key:
            return b
    for b, why in REFUSED.items():
        if b.lower() == key:
            raise UserError(f"--backend {name}: {why} (use one of: {', '.join(BACKENDS)})")
    raise UserError(f"--backend {name}: unknown QAT backend (valid: {', '.join(BACKENDS)})")
