"""Devices and seeds: what every stage that runs a model needs, without importing the trainer."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..errors import UserError


def select_device(device: str) -> torch.device:
    """``cpu``, ``0``, ``cuda:0``... -> torch.device; a CUDA device without CUDA is a UserError."""
    d = str(device).strip().lower()
    if d in ("", "cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(d if d.startswith("cuda") else f"cuda:{d.split(',')[0]}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dist_rank() -> int:
    """This process's torchrun rank (0 when not under torchrun)."""
    return max(int(os.environ.get("RANK", 0)), 0)
