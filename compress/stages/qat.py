"""The ``qat`` stage: prepare with MQBench, calibrate, fine-tune with the one training loop, deploy the
backend's files and check the int8 model in onnxruntime.

One run ships one model: the best epoch's (by the trainer's fitness, as for any training run).
``weights.pt`` (its QAT-trained float weights), ``qat_state.pt`` (its quantizer state), the reported
fake-quant mAP, ``deploy/`` and the int8 ONNX's onnxruntime mAP all come from that epoch.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.config import Callback, TrainOptions, callback_options
from ..errors import UserError
from ..fileio import unfinished_run
from ..options import option
from ..quant.backends import BACKENDS, resolve_backend
from ..log import note
from .base import DataInfo, Report, load_input_model, output_dir
from .distill import DistillOptions
from .distill import preflight as distill_preflight

QAT_STATE = "qat_state.pt"


@dataclass(kw_only=True)
class QATOptions(DistillOptions, TrainOptions):
    """What ``compress qat`` takes: the training flags plus the backend, calibration and distillation (the
    teacher runs in float)."""

    cfg: str | dict | None = option(None, cli=False)
    epochs: int = option(5, "QAT fine-tuning epochs")
    backend: str | None = option(None, f"MQBench backend: NNIE, Tensorrt (also {', '.join(list(BACKENDS)[2:])})",
                                 required=True)
    lr: float = option(1e-3, "learning rate of the QAT fine-tuning (replaces the hyp's lr0; warmup is off)")
    calib_batches: int = option(10, "training batches for calibration")

    def check(self):
        super().check()
        backend = resolve_backend(self.backend)
        for pkg in backend.requires:
            if importlib.util.find_spec(pkg) is None:
                raise UserError(f"--backend {backend.name}: its deploy step needs the {pkg} package "
                                f"(pip install {pkg})")
        self.require_positive("calib_batches")
        self.require_range("lr", 0, 1, lo_open=True, what="a learning rate")


class QATCallback(Callback):
    """Trains the MQBench-prepared, calibrated twin of the float model instead of the float model.

    The loss and the validator then work on the fake-quantized model; each artifact holds the
    QAT-trained float weights (``weights.pt``, ultralytics key names) and the quantizer state
    (``qat_state.pt``). There is no EMA (the EMA of fake-quant weights would need its own ranges).
    """

    uses_ema = False

    def __init__(self, backend, calib_batches: list):
        self.backend = resolve_backend(backend)
        self.calib = calib_batches
        self.prepared = None
        self.float = self.ptq = None

    def on_prepare(self, trainer):
        from ..quant.qat import calibrate, mark_no_decay, prepare_qat

        float_model = trainer.model
        if trainer.main:
            self.float = trainer.validate(float_model)
        t0 = time.time()
        self.prepared = prepare_qat(float_model, self.backend)
        n = calibrate(self.prepared, self.calib)
        mark_no_decay(self.prepared)  # quantizer scales stay out of weight decay
        print(f"QAT: prepared for {self.backend.name}, calibrated on {n} batches in {time.time() - t0:.1f}s")
        if trainer.main:
            self.ptq = trainer.validate(self.prepared)
            print(f"PTQ (calibration only, fake-quant): mAP50 {self.ptq['map50']:.3f}  "
                  f"mAP50-95 {self.ptq['map']:.3f}")
        self.prepared.train()

    def train_model(self, trainer, model):
        return self.prepared

    def artifact(self, trainer):
        from ..quant.qat import float_state_dict, qat_state_dict

        return float_state_dict(self.prepared, trainer.float_model), {QAT_STATE: qat_state_dict(self.prepared)}

    def on_train_end(self, trainer, report):
        report["qat"] = {"backend": self.backend.name, "ptq_map50": self.ptq and self.ptq["map50"],
                         "ptq_map": self.ptq and self.ptq["map"]}


def preflight(o: QATOptions, model, info: DataInfo) -> None:
    """The model fits the dataset and the training split holds the calibration batches."""
    info.check_model(model)
    info.need("train", o.calib_batches, o.batch, "--calib-batches")
    distill_preflight(o, model)


def run(o: QATOptions) -> Report:
    """QAT of ``--weights`` for ``--backend``, then deploy files and onnxruntime checks in the run folder.

    Returns the report (also in report.json): float, PTQ, QAT (fake-quant) and, where the backend writes a
    Q/DQ ONNX (TensorRT), its mAP through onnxruntime, its max abs difference from the fake-quant torch
    model and its latency.
    """
    from ..data.dataset import load_data_yaml, load_hyp
    from ..engine.trainer import Trainer
    from ..engine.validate import evaluate, load_batches, metrics_table
    from ..export import onnx_latency
    from ..quant.deployment import OnnxDetector, check_qdq_onnx, deploy
    from ..quant.qat import check_float_weights, load_qat_state
    from ..tables import format_table

    o.validate()
    backend = resolve_backend(o.backend)
    if not o.data:
        raise UserError("--data DATA.yaml is required")
    data = load_data_yaml(o.data)
    model = load_input_model(o, data, need_weights="QAT fine-tunes a trained model (an artifact or a .pt)")
    check_float_weights(model.state_dict(), o.weights)
    preflight(o, model, DataInfo.of(data))
    src = Path(o.weights)
    if (src if src.is_dir() else src.parent).joinpath(QAT_STATE).is_file():
        note(f"{o.weights} is a QAT run: QAT starts again from its float weights (its {QAT_STATE} ranges are "
             f"not reused)")
    distill = o.distill_callbacks()
    out = output_dir(o, "qat")
    # fine-tuning a trained model: a small constant-ish LR and no warmup (warmup's bias LR of 0.1 would
    # throw the calibrated ranges off)
    o = o.replace(out=str(out), imgsz=o.resolved_imgsz(), hyp={**load_hyp(o.hyp), "lr0": o.lr, "warmup_epochs": 0.0},
                  extra=callback_options(distill))
    with unfinished_run(out, "qat"):
        calib = load_batches(data["train"], o.imgsz, o.batch, o.calib_batches, data["nc"], seed=o.seed,
                             workers=o.workers, prefix="calib: ")
        cb = QATCallback(backend, calib)
        trainer = Trainer(o, [cb, *distill], model=model, data=data)
        report = trainer.fit()
        # the model every file describes: the best epoch's, as weights.pt holds it
        load_qat_state(cb.prepared, out / QAT_STATE)
        prepared = cb.prepared.eval()
        print(f"deploying for {backend.name} ...")
        files = deploy(prepared, backend, out / "deploy", o.imgsz)
        best = trainer.validate(prepared)
        rep = Report.from_dict(report)
        rep.stage = "qat"
        rep.set_metrics(best)
        rep.details.update(backend=backend.name, deploy={k: str(v) for k, v in files.items()},
                           float_map50=cb.float["map50"], float_map=cb.float["map"],
                           qat_map50=best["map50"], qat_map=best["map"])
        rows = [["float", cb.float["map50"], cb.float["map"]],
                ["PTQ (fake-quant)", cb.ptq["map50"], cb.ptq["map"]],
                [f"QAT best of {o.epochs} ep (fake-quant), epoch {report.get('best_epoch')}", best["map50"],
                 best["map"]]]
        if "qdq_onnx" in files:
            val = trainer.val_loader
            images = next(iter(val))[0][:8].float() / 255
            diff = check_qdq_onnx(files["qdq_onnx"], prepared, images)
            onnx_res = evaluate(OnnxDetector(files["qdq_onnx"]), val, data["nc"], data["names"], desc="int8 onnx")
            lat = onnx_latency(files["qdq_onnx"], o.imgsz, runs=20, threads=2)
            rep.set_metrics(onnx_res)
            rep.latency_ms = lat["median_ms"]
            rep.details.update(qdq_max_abs_diff=diff, int8_map50=onnx_res["map50"], int8_map=onnx_res["map"])
            rows.append(["int8 Q/DQ ONNX (onnxruntime)", onnx_res["map50"], onnx_res["map"]])
            print(f"Q/DQ ONNX vs fake-quant torch: max abs diff {diff:.3g} px on 8 val images")
            print(metrics_table(onnx_res))
        print(format_table(["model", "mAP50", "mAP50-95"], [[r[0], f"{r[1]:.3f}", f"{r[2]:.3f}"] for r in rows]))
        from ..fileio import write_json

        write_json(out / "report.json", rep.to_dict())
    print(f"QAT artifact (float weights + {QAT_STATE}) and {backend.name} deploy files in {out}")
    return rep
