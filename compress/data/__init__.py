"""YOLO-format datasets: data.yaml/hyp loading, the detection DataLoader, augmentation, a synthetic set."""
from .augment import letterbox, scale_boxes
from .dataset import (YoloDataset, YoloSampler, create_dataloader, img2label_paths, load_data_yaml,
                      load_hyp)
from .synth import make_synthetic_dataset

__all__ = ["YoloDataset", "YoloSampler", "create_dataloader", "img2label_paths", "letterbox",
           "load_data_yaml", "load_hyp", "make_synthetic_dataset", "scale_boxes"]
