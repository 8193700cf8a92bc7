"""compress: prune (EagleEye, Network Slimming) and quantize (MQBench QAT) YOLOv5-family detectors."""

__version__ = "0.1.0"

from .model.artifact import load_model, save_model  # noqa: E402
from .model.profile import profile  # noqa: E402

__all__ = ["load_model", "save_model", "profile", "__version__"]
