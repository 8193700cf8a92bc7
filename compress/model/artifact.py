"""The artifact every stage reads and writes: ``model.yaml`` + ``weights.pt`` + ``report.json``.

``model.yaml`` is the explicit-channel normal form (plus ``names``), ``weights.pt`` a plain fp32 state_dict
with ultralytics key names (loadable with ``torch.load(weights_only=True)``), ``report.json`` what the
stage measured. ``--weights`` may name a run directory, an artifact's ``weights.pt`` or an ultralytics
``.pt`` checkpoint (read with a restricted unpickler, never executing pickled code).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import load_tensors, save_torch, unfinished_stage, write_json, write_yaml
from .yolo import Model, load_cfg

WEIGHTS, CFG, REPORT = "weights.pt", "model.yaml", "report.json"
ARTIFACT_FILES = (CFG, WEIGHTS, REPORT)


def save_model(model, out_dir, report=None, state_dict: dict | None = None, extra_files: dict | None = None) -> Path:
    """Write ``model`` as an artifact in ``out_dir`` (each file atomically; report.json last).

    ``report`` (a dict or a stage :class:`~compress.stages.base.Report`) is written with ``params`` filled
    in. ``state_dict`` replaces the model's own weights (e.g. the float weights of a QAT-trained model,
    under the model's key names); ``extra_files`` are more tensor files written beside them
    (``{"qat_state.pt": state}``). Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = model.state_dict() if state_dict is None else state_dict
    sd = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
          for k, v in src.items()}
    save_torch(sd, out / WEIGHTS)
    for name, obj in (extra_files or {}).items():
        save_torch(obj, out / name)
    cfg = dict(model.yaml)
    cfg["names"] = list(getattr(model, "names", [])) or cfg.get("names")
    write_yaml(out / CFG, cfg)
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})
    rep["params"] = sum(p.numel() for p in model.parameters())
    write_json(out / REPORT, rep)
    return out


def resolve_weights(weights) -> tuple[Path | None, Path]:
    """Map a ``--weights`` value to ``(yaml_path_or_None, weights_file)``.

    A run directory gives its model.yaml and weights.pt; a ``weights.pt`` with a model.yaml beside it gives
    both; any other file gives ``(None, file)`` (an ultralytics checkpoint, or a state_dict used with --cfg).
    """
    p = Path(weights)
    where = p if p.is_dir() else p.parent
    stage = unfinished_stage(where) if (p.is_dir() or p.name == WEIGHTS) else None
    if stage:
        hint = {"train": f"resume it with `compress train --resume {where}`, or use {where / 'last'}",
                "finetune": f"resume it with `compress train --resume {where}`, or use {where / 'last'}",
                "eagleeye": f"resume it with `compress eagleeye --resume --out {where} ...`"}.get(
                    stage, "run the stage again")
        raise UserError(f"{where}: an unfinished {stage} run (it stopped before it completed, or is still "
                        f"running); {hint}")
    if p.is_dir():
        if not (p / WEIGHTS).is_file() or not (p / CFG).is_file():
            raise UserError(f"{p}: not an artifact directory (needs {CFG} and {WEIGHTS})")
        return p / CFG, p / WEIGHTS
    if not p.is_file():
        raise UserError(f"{p}: no such weights file or artifact directory")
    if (p.parent / CFG).is_file() and p.name == WEIGHTS:
        return p.parent / CFG, p
    return None, p


def read_report(weights) -> dict:
    """The report.json of an artifact (``{}`` when there is none)."""
    p = Path(weights)
    d = p if p.is_dir() else p.parent
    f = d / REPORT
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}


def load_state_dict_checked(model, sd, source) -> None:
    """Load ``sd`` into ``model`` strictly; raise UserError naming the first bad key or shape."""
    own = model.state_dict()
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{source}: not a state_dict of tensors")
    for k, v in own.items():
        if k not in sd:
            raise UserError(f"{source}: missing tensor '{k}' (expected shape {tuple(v.shape)})")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)}, "
                            f"the model YAML needs {tuple(v.shape)}")
    extra = [k for k in sd if k not in own]
    if extra:
        raise UserError(f"{source}: unexpected tensor '{extra[0]}' (not in the model YAML)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def load_model(cfg_or_checkpoint=None, weights=None, nc: int | None = None) -> Model:
    """Build a model from a YAML, an artifact directory, an artifact ``weights.pt`` or an ultralytics ``.pt``.

    ``load_model("yolov5s.yaml")`` builds fresh weights; ``load_model("runs/prune/exp")`` or
    ``load_model(weights="yolov5s.pt")`` loads trained ones; ``load_model("x.yaml", "weights.pt")`` loads a
    state_dict into that YAML. Raises UserError for missing files or mismatched shapes.
    """
    cfg = cfg_or_checkpoint
    if cfg is not None and weights is None and not _is_yaml(cfg):
        cfg, weights = None, cfg
    if weights is None:
        if cfg is None:
            raise UserError("give a model YAML (--cfg) or weights (--weights)")
        return Model(cfg, nc=nc)
    yaml_path, wfile = resolve_weights(weights)
    names = None
    if cfg is None and yaml_path is not None:
        cfg = yaml_path
    if cfg is not None:
        sd = load_tensors(wfile)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    else:
        from .ultralytics_ckpt import load_checkpoint

        ck = load_checkpoint(wfile)
        cfg, sd, names = ck["cfg"], ck["state_dict"], ck.get("names")
    d = load_cfg(cfg)
    model = Model(d, names=names or d.get("names"))
    load_state_dict_checked(model, sd, wfile)
    return model


def _is_yaml(x) -> bool:
    if isinstance(x, dict):
        return True
    p = Path(str(x))
    return p.suffix in (".yaml", ".yml") or (not p.exists() and not p.suffix)
