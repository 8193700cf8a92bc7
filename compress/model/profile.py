"""Parameter and FLOPs profiling (thop), whole model and per layer."""
from __future__ import annotations

import copy
import warnings

import torch

from ..errors import UserError


def check_imgsz(model, imgsz: int) -> int:
    """Raise UserError unless ``imgsz`` is a positive multiple of the model's largest stride."""
    s = int(max(model.stride.tolist())) if hasattr(model, "stride") else 32
    if not isinstance(imgsz, int) or imgsz <= 0 or imgsz % s:
        raise UserError(f"--imgsz {imgsz} must be a positive multiple of the model's stride {s}")
    return imgsz


def profile(model, imgsz: int = 640, per_layer: bool = False):
    """Params and GFLOPs (2 x thop MACs) of ``model`` at a square ``imgsz``.

    Returns ``{"params": int, "gflops": float}``; with ``per_layer`` also ``"layers"``: a list with one
    ``{"params", "gflops"}`` per row of ``model.model``. The model itself is not modified.
    """
    import thop

    check_imgsz(model, imgsz)
    m = copy.deepcopy(model).float().cpu().eval()
    x = torch.zeros(1, int(getattr(model, "yaml", {}).get("ch", 3)), imgsz, imgsz)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, _, info = thop.profile(m, inputs=(x,), verbose=False, ret_layer_info=True)
    out = {"params": sum(t.numel() for t in model.parameters()), "gflops": 2 * macs / 1e9}
    if per_layer:
        rows = info["model"][2]
        out["layers"] = [
            {"params": sum(t.numel() for t in layer.parameters()), "gflops": 2 * rows[str(i)][0] / 1e9}
            for i, layer in enumerate(model.model)
        ]
    return out


def layer_table(model, imgsz: int = 640):
    """Per-layer rows for reports: index, module, from, n, channels in, channels out, params, GFLOPs share.

    Returns ``(headers, rows, totals)`` where ``totals`` is :func:`profile`'s result.
    """
    from .yolo import parse_cfg

    specs, _ = parse_cfg(model.yaml)
    prof = profile(model, imgsz, per_layer=True)
    ch, rows = [], []
    for s, layer in zip(specs, prof["layers"]):
        c_in = ch[s.f] if isinstance(s.f, int) and s.i > 0 else (
            [ch[j] for j in s.f] if isinstance(s.f, list) else 3)
        c_out = "-" if s.type == "Detect" else s.c_out
        share = layer["gflops"] / prof["gflops"] if prof["gflops"] else 0.0
        rows.append([s.i, s.type, str(s.f), s.n, str(c_in), str(c_out), layer["params"], f"{share:.1%}"])
        ch.append(s.c_out)
    headers = ["layer", "module", "from", "n", "ch in", "ch out", "params", "GFLOPs %"]
    return headers, rows, prof
