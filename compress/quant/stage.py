"""The ``compress qat`` stage: prepare with MQBench, calibrate, fine-tune with the one training loop,
deploy the backend's files and check the int8 model in onnxruntime."""
from __future__ import annotations

import time
from pathlib import Path

from ..engine.trainer import Callback, Trainer, TrainOptions
from ..engine.validate import evaluate, load_batches, metrics_table
from ..errors import UserError
from ..export import onnx_latency
from ..fileio import save_torch, write_json
from ..model.artifact import WEIGHTS, load_model
from .deployment import OnnxDetector, check_qdq_onnx, deploy
from .qat import (calibrate, check_float_weights, float_state_dict, mark_no_decay, prepare_qat,
                  resolve_backend, save_qat_state)

QAT_STATE = "qat_state.pt"


class QATCallback(Callback):
    """Swaps the trainer's model for its MQBench-prepared, calibrated twin before the optimizer exists.

    The loss, the validator and the checkpoints then work on the fake-quantized model; each saved
    artifact gets the QAT-trained float weights (``weights.pt``) and the quantizer state (``qat_state.pt``).
    """

    def __init__(self, backend: str, calib_batches: list):
        self.backend = backend
        self.calib = calib_batches
        self.prepared = None
        self.float = self.ptq = None

    def on_prepare(self, trainer):
        trainer.use_ema = False  # the EMA of fake-quant weights would need its own quantizer ranges
        float_model = trainer.model
        if trainer.main:
            self.float = trainer.validate(float_model)
        t0 = time.time()
        self.prepared = prepare_qat(float_model, self.backend)
        n = calibrate(self.prepared, self.calib)
        mark_no_decay(self.prepared)  # quantizer scales stay out of weight decay
        print(f"QAT: prepared for {self.backend}, calibrated on {n} batches in {time.time() - t0:.1f}s")
        if trainer.main:
            self.ptq = trainer.validate(self.prepared)
            print(f"PTQ (calibration only, fake-quant): mAP50 {self.ptq['map50']:.3f}  "
                  f"mAP50-95 {self.ptq['map']:.3f}")
        self.prepared.train()
        trainer.model = self.prepared

    def on_save(self, trainer, out_dir):
        save_torch(float_state_dict(self.prepared, trainer.float_model), Path(out_dir) / WEIGHTS)
        save_qat_state(self.prepared, Path(out_dir) / QAT_STATE)

    def on_train_end(self, trainer, report):
        report["qat"] = {"backend": self.backend, "ptq_map50": self.ptq and self.ptq["map50"],
                         "ptq_map": self.ptq and self.ptq["map"]}


def run_qat(opts: TrainOptions, backend: str, calib_batches: int = 10, lr: float = 1e-3) -> dict:
    """QAT of ``opts.weights`` for ``backend``, then deploy files and onnxruntime checks in ``opts.out``.

    ``lr`` replaces the hyp's lr0 (QAT fine-tunes: 1e-3 by default) and warmup is off.

    Returns the report (also in report.json): float, PTQ, QAT (fake-quant) and, for TensorRT, the Q/DQ
    ONNX's mAP through onnxruntime, its max abs difference from the fake-quant torch model and latency.
    """
    backend = resolve_backend(backend)
    if not opts.weights:
        raise UserError("--weights is required: QAT fine-tunes a trained model (an artifact or a .pt)")
    if calib_batches < 1:
        raise UserError(f"--calib-batches must be >= 1, got {calib_batches}")
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")
    # fine-tuning a trained model: a small constant-ish LR and no warmup (warmup's bias LR of 0.1 would
    # throw the calibrated ranges off)
    from ..data.dataset import load_hyp

    opts.hyp = {**load_hyp(opts.hyp), "lr0": lr, "warmup_epochs": 0.0}
    model = load_model(weights=opts.weights)
    check_float_weights(model.state_dict(), opts.weights)
    trainer = Trainer(opts, model=model)
    data = trainer.data
    need = calib_batches * opts.batch
    if len(data["train"]) < need:
        raise UserError(f"{opts.data}: {len(data['train'])} training images, fewer than the "
                        f"{calib_batches} x {opts.batch} = {need} calibration images asked "
                        f"(lower --calib-batches or --batch)")
    calib = load_batches(data["train"], opts.imgsz, opts.batch, calib_batches, data["nc"], seed=opts.seed,
                         prefix="calib: ")
    cb = QATCallback(backend, calib)
    trainer.callbacks.append(cb)
    report = trainer.fit()
    float_res, val = cb.float, trainer.val_loader
    prepared = cb.prepared.eval()
    out = Path(opts.out)
    print(f"deploying for {backend} ...")
    files = deploy(prepared, backend, out / "deploy", opts.imgsz)
    report.update(stage="qat", backend=backend, deploy={k: str(v) for k, v in files.items()},
                  float_map50=float_res["map50"], float_map=float_res["map"],
                  qat_map50=report.get("map50"), qat_map=report.get("map"))
    rows = [["float", float_res["map50"], float_res["map"]],
            ["PTQ (fake-quant)", cb.ptq["map50"], cb.ptq["map"]],
            [f"QAT {opts.epochs} ep (fake-quant)", report["qat_map50"], report["qat_map"]]]
    if "qdq_onnx" in files:
        images = next(iter(val))[0][:8].float() / 255
        diff = check_qdq_onnx(files["qdq_onnx"], prepared, images)
        onnx_res = evaluate(OnnxDetector(files["qdq_onnx"]), val, data["nc"], data["names"], desc="int8 onnx")
        lat = onnx_latency(files["qdq_onnx"], opts.imgsz, runs=20, threads=2)
        report.update(qdq_max_abs_diff=diff, int8_map50=onnx_res["map50"], int8_map=onnx_res["map"],
                      latency_ms=lat["median_ms"], map50=onnx_res["map50"], map=onnx_res["map"])
        rows.append(["int8 Q/DQ ONNX (onnxruntime)", onnx_res["map50"], onnx_res["map"]])
        print(f"Q/DQ ONNX vs fake-quant torch: max abs diff {diff:.3g} px on 8 val images")
        print(metrics_table(onnx_res))
    from ..tables import format_table

    print(format_table(["model", "mAP50", "mAP50-95"], [[r[0], f"{r[1]:.3f}", f"{r[2]:.3f}"] for r in rows]))
    write_json(out / "report.json", report)
    print(f"QAT artifact (float weights + qat_state.pt) and {backend} deploy files in {out}")
    return report
