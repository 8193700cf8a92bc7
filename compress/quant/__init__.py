"""Quantization-aware training with MQBench (NNIE, TensorRT, ...) and the backends' deploy files.

``backends`` is the table of supported backends (no MQBench import); ``mqbench_compat`` holds the fixes
mqbench-torch2 0.1.1 needs on torch 2.x; ``qat`` prepares, calibrates and saves a YOLOv5 model;
``deployment`` writes the backend's files and runs the ONNX in onnxruntime. The names below are loaded
on first use, so importing the package (e.g. for the backend table) does not import MQBench.
"""
import importlib

from .backends import BACKENDS, Backend, resolve_backend

_LAZY = {
    "OnnxDetector": "deployment", "check_qdq_onnx": "deployment", "deploy": "deployment",
    "deploy_graph": "deployment", "onnx_vs_torch": "deployment",
    "calibrate": "qat", "check_float_weights": "qat", "detect_head": "qat", "is_quantized_state": "qat",
    "load_qat_state": "qat", "mark_no_decay": "qat", "prepare_qat": "qat", "quantizer_param_groups": "qat",
    "quantizer_param_names": "qat", "save_qat_state": "qat",
}

__all__ = ["BACKENDS", "Backend", "resolve_backend", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
