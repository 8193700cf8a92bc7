"""The ``bench`` stage: onnxruntime CPU latency of one or more models, side by side."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..fileio import check_output_dir
from ..model.artifact import ARTIFACT_FILES
from ..options import DEFAULT_IMGSZ, MAX_IMGSZ, Options, option
from .base import Report


@dataclass(kw_only=True)
class BenchOptions(Options):
    """What ``compress bench`` takes."""

    weights: list = option([], "artifact dirs, weights files or model YAMLs (the first is the reference)",
                           recipe=False)
    cfg: str | None = option(None, hidden=True)
    imgsz: int | None = option(None, "image size in pixels (square)", flags=("--img", "--img-size"),
                               default_help=f"the first artifact's own, else {DEFAULT_IMGSZ}")
    runs: int = option(50, "timed runs per model")
    threads: int = option(2, "onnxruntime intra-op threads")
    out: str | None = option(None, "write report.json (latency of the first model) into this folder", recipe=False)

    def check(self):
        super().check()
        self.require_positive("runs", "threads", "imgsz")
        if self.imgsz is not None and (self.imgsz % 32 or self.imgsz > MAX_IMGSZ):
            raise UserError(f"--imgsz {self.imgsz} must be a positive multiple of 32, at most {MAX_IMGSZ}")
        if not (self.weights or self.cfg):
            raise UserError("give --weights W [W ...]")

    def resolved_imgsz(self) -> int:
        """``--imgsz``, else the first artifact's recorded image size, else 640."""
        from ..options import ModelInput

        return ModelInput(imgsz=self.imgsz, weights=(self.weights or [None])[0]).resolved_imgsz()


def run(o: BenchOptions) -> Report:
    """Measure and print the latency table; report.json of the first model when --out is given."""
    from ..export import compare_latency, latency_table
    from ..fileio import write_json
    from ..model.artifact import load_model
    from ..model.profile import check_imgsz

    o.validate()
    imgsz = o.resolved_imgsz()
    if o.out:
        check_output_dir(o.out, taken=ARTIFACT_FILES)
    sources = list(o.weights or []) or [o.cfg]
    models = {}
    for s in sources:
        m = load_model(s)
        check_imgsz(m, imgsz)
        models[str(s)] = m
    rows = compare_latency(models, imgsz, o.runs, o.threads)
    print(f"onnxruntime CPU, {o.threads} threads, {imgsz}x{imgsz}, median of {o.runs} runs")
    print(latency_table(rows))
    r = rows[0]
    rep = Report(stage="bench", params=r["params"], gflops=r["gflops"], imgsz=imgsz, latency_ms=r["median_ms"],
                 parent=r["model"], options=o.to_dict() | {"imgsz": imgsz}, details={"threads": o.threads,
                                                                                   "models": rows})
    if o.out:
        write_json(f"{o.out}/report.json", rep.to_dict())
    return rep
