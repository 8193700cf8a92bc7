"""Quantization-aware training with MQBench (NNIE, TensorRT, ...) and the backends' deploy files.

``mqbench_compat`` holds the fixes mqbench-torch2 0.1.1 needs on torch 2.x; ``qat`` prepares, calibrates
and saves a YOLOv5 model; ``deployment`` writes the backend's files and runs the ONNX in onnxruntime.
"""
from .backends import Backend
from .deployment import OnnxDetector, check_qdq_onnx, deploy, deploy_graph, onnx_vs_torch
from .qat import (
    BACKENDS, calibrate, check_float_weights, detect_head, is_quantized_state, load_qat_state, mark_no_decay,
    prepare_qat, quantizer_param_groups, quantizer_param_names, resolve_backend, save_qat_state,
)

__all__ = [
    "BACKENDS", "Backend", "resolve_backend", "prepare_qat", "calibrate", "quantizer_param_groups",
    "quantizer_param_names",
    "mark_no_decay", "detect_head", "is_quantized_state", "check_float_weights", "save_qat_state",
    "load_qat_state", "deploy", "deploy_graph", "check_qdq_onnx", "onnx_vs_torch", "OnnxDetector",
]
