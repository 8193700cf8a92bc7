"""``compress qat``: quantization-aware training with MQBench and the backend's deploy files."""
from __future__ import annotations

from .common import add_stage_command


def register(sub):
    """Add the ``qat`` subcommand."""
    add_stage_command(
        sub, "qat", "quantization-aware training with MQBench (NNIE, Tensorrt, ...) + deploy files",
        "Prepare the model with MQBench for --backend, calibrate, fine-tune with fake quantization, write the "
        "backend's deploy files and check the int8 ONNX in onnxruntime. Every file of a run (weights.pt, "
        "qat_state.pt, deploy/, the reported mAP) describes the best epoch's model.")
