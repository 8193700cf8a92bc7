"""What every stage shares: the typed :class:`Report`, the run folder, and loading the input model.

A stage is ``run(options) -> Report``. Its run folder is checked before any work (:func:`output_dir`),
marked unfinished while the stage writes into it (:func:`~compress.fileio.unfinished_run`) and its
``report.json`` is a :class:`~compress.report.Report`: one set of names that the recipe summary reads for
every stage.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..fileio import check_output_dir, new_run_dir
from ..model.artifact import ARTIFACT_FILES
from ..report import METRICS, Report  # noqa: F401  (the stages' report type, re-exported)

def output_dir(o, command: str, resume: bool = False) -> Path:
    """The run folder of ``o.out`` (or a fresh ``runs/<command>/expN``), checked before any work."""
    path = Path(o.out) if o.out else new_run_dir(command, getattr(o, "name", None) or "exp")
    return check_output_dir(path, "--out", taken=ARTIFACT_FILES, resume=resume)


def load_input_model(o, data: dict | None = None, seed: int = 0, need_weights: str | None = None):
    """The model a stage starts from: ``--weights`` (with ``--cfg`` for a bare state_dict) or ``--cfg``.

    ``--cfg`` alone builds seeded random weights (with the dataset's nc when ``data`` is given);
    ``need_weights`` (a reason) makes ``--weights`` mandatory. With ``data`` the model's nc must match
    and it takes the dataset's class names. The image size is checked against the model's strides.
    Returns the model in eval mode.
    """
    import torch

    from ..model.artifact import load_model
    from ..model.profile import check_imgsz

    if not o.weights and (need_weights or not o.cfg):
        raise UserError(f"--weights is required: {need_weights}" if need_weights else
                        "give --weights (artifact dir or .pt) and/or --cfg MODEL.yaml")
    if o.weights:
        model = load_model(o.cfg, o.weights)
    else:
        torch.manual_seed(seed)
        model = load_model(o.cfg, nc=data["nc"] if data else None)
    if data is not None:
        if model.nc != data["nc"]:
            raise UserError(f"{data.get('yaml_file', o.data)}: nc={data['nc']} but the model predicts {model.nc} "
                            f"classes")
        model.names = list(data["names"])
    check_imgsz(model, o.resolved_imgsz())
    return model.eval()


def source_name(o) -> str:
    """How a report names the model a stage started from: the absolute ``--weights`` path (so that a report's
    lineage can be followed from any working directory), else the model YAML."""
    w = getattr(o, "weights", None)
    if w:
        return str(Path(w).absolute())
    cfg = getattr(o, "cfg", None)
    return cfg.get("yaml_file", "<cfg>") if isinstance(cfg, dict) else str(cfg)


class DataInfo:
    """What the checks before a stage need of a dataset: its classes and how many images each split has.

    From a loaded data.yaml (:meth:`of`) or, for a recipe's synthetic set that is not written yet, from
    its options (:meth:`synthetic`).
    """

    def __init__(self, nc: int, names, sizes: dict, source: str):
        self.nc, self.names, self.sizes, self.source = nc, list(names), dict(sizes), source

    @classmethod
    def of(cls, data: dict) -> "DataInfo":
        """The info of a loaded data.yaml (``compress.data.dataset.load_data_yaml``)."""
        sizes = {k: len(data[k]) for k in ("train", "val", "test") if k in data}
        return cls(data["nc"], data["names"], sizes, str(data.get("yaml_file", "data.yaml")))

    @classmethod
    def synthetic(cls, train: int, val: int, classes: int, source: str) -> "DataInfo":
        """The info of a synthetic set of these sizes."""
        from ..data.shapes import SHAPES

        return cls(classes, SHAPES[:classes], {"train": train, "val": val}, source)

    def need(self, split: str, batches: int, batch: int, flag: str, given: bool = True) -> None:
        """UserError unless ``split`` holds ``batches`` x ``batch`` images, when ``flag`` was asked for (a
        default takes up to that many: all of a smaller split)."""
        have, want = self.sizes.get(split, 0), batches * batch
        if given and have < want:
            raise UserError(f"{self.source}: {flag} {batches} x --batch {batch} = {want} {split} images asked, the "
                            f"{split} split has {have} (lower {flag} or --batch)")

    def check_model(self, model) -> None:
        """UserError when the model predicts another number of classes than the dataset has."""
        if model.nc != self.nc:
            raise UserError(f"{self.source}: nc={self.nc} but the model predicts {model.nc} classes")
