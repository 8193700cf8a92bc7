"""YOLOv5 blocks, YAML parsing and normal form, artifact I/O, profiling."""
from .artifact import load_model, save_model
from .profile import profile
from .yolo import Model, parse_cfg

__all__ = ["Model", "parse_cfg", "load_model", "save_model", "profile"]
