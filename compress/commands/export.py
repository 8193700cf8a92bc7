"""``compress export``: ONNX with decoded outputs, checked against torch in onnxruntime."""
from __future__ import annotations

from .common import add_stage_command


def register(sub):
    """Add the ``export`` subcommand."""
    add_stage_command(
        sub, "export", "export to ONNX (decoded outputs) and check it in onnxruntime",
        "Export the model to ONNX with decoded outputs (1 x anchors x (5 + nc), xywh in input pixels), run it "
        "in onnxruntime on a random batch and compare with torch; exit 1 when they differ by more than 1e-4 "
        "(boxes in units of the image size).")
