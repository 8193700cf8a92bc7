"""The report every stage writes (``report.json``) and the recipe summary reads: one set of names."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

METRICS = {"coco": "COCO mAP (pycocotools-exact)", "ultralytics": "ultralytics val.py mAP"}


@dataclass
class Report:
    """What a stage measured; ``report.json`` is :meth:`to_dict` (``details`` merged at the top level).

    ``params``/``gflops`` of the model the stage produced (or measured) at ``imgsz``; ``flops_ratio`` its
    FLOPs over its parent's; ``map50``/``map`` by the mAP definition named in ``metric``; ``latency_ms``
    where measured; ``parent`` the artifact it came from; ``options`` the stage's options; ``details``
    everything stage-specific (per-layer tables, candidates, QAT figures, ...).
    """

    stage: str
    params: int | None = None
    gflops: float | None = None
    imgsz: int | None = None
    flops_ratio: float | None = None
    map50: float | None = None
    map: float | None = None
    metric: str | None = None
    latency_ms: float | None = None
    parent: str | None = None
    options: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @classmethod
    def common_keys(cls) -> tuple:
        """The names every report uses the same way."""
        return tuple(f.name for f in fields(cls) if f.name != "details")

    def to_dict(self) -> dict:
        """The report.json content: the common keys, then the details."""
        d = {k: getattr(self, k) for k in self.common_keys()}
        d.update({k: v for k, v in self.details.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """A report read back (unknown keys go to ``details``)."""
        d = dict(d or {})
        common = {k: d.pop(k) for k in cls.common_keys() if k in d}
        common.setdefault("stage", "?")
        return cls(**common, details=d)

    @classmethod
    def read(cls, folder) -> "Report | None":
        """The report.json of a run folder (None when it has none or it is unreadable)."""
        f = Path(folder) / "report.json"
        try:
            return cls.from_dict(json.loads(f.read_text())) if f.is_file() else None
        except (json.JSONDecodeError, OSError, TypeError):
            return None

    def set_metrics(self, res: dict, metric: str = "coco") -> "Report":
        """Take mAP from an evaluation result (:func:`compress.engine.validate.evaluate`) in the named definition.

        ``map50``/``map``/``precision``/``recall`` follow ``metric``; when the result holds both
        definitions, ``details`` keeps both under their names (``coco``, ``ultralytics``), so nobody has to
        guess which one a number is.
        """
        chosen = res.get(metric, res) if metric != "coco" else res
        self.map50, self.map, self.metric = chosen["map50"], chosen["map"], metric
        self.details.update(precision=chosen.get("precision"), recall=chosen.get("recall"))
        if isinstance(res.get("ultralytics"), dict):
            for name, r in (("coco", res), ("ultralytics", res["ultralytics"])):
                self.details[name] = {k: r.get(k) for k in ("map50", "map", "precision", "recall")}
        return self
