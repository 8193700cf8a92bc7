"""YOLO-format datasets: data.yaml/hyp loading, the detection DataLoader, augmentation, a synthetic set.

The names below are loaded on first use (OpenCV is imported only by what reads images).
"""
import importlib

_LAZY = {"letterbox": "augment", "scale_boxes": "augment", "YoloDataset": "dataset", "YoloSampler": "dataset",
         "create_dataloader": "dataset", "img2label_paths": "dataset", "load_data_yaml": "dataset",
         "load_hyp": "dataset", "make_synthetic_dataset": "synth"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
