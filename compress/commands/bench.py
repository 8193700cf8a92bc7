"""``compress bench``: onnxruntime CPU latency of one or more models, side by side."""
from __future__ import annotations

from .common import add_stage_command


def register(sub):
    """Add the ``bench`` subcommand."""
    add_stage_command(sub, "bench", "onnxruntime CPU latency (median) of models side by side",
                      "Export each model to ONNX and time it in onnxruntime, interleaved, with params, GFLOPs "
                      "and ratios to the first model.")
