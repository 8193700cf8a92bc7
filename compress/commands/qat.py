"""``compress qat``: quantization-aware training with MQBench and the backend's deploy files."""
from __future__ import annotations

from .common import add_model_args, add_out_arg
from .train import add_train_args, options_from_args


def register(sub):
    """Add the ``qat`` subcommand."""
    p = sub.add_parser("qat", help="quantization-aware training with MQBench (NNIE, Tensorrt, ...) + deploy files",
                       description="Prepare the model with MQBench for --backend, calibrate, fine-tune with "
                                   "fake quantization, write the backend's deploy files and check the int8 "
                                   "ONNX in onnxruntime.")
    add_model_args(p, cfg=False, imgsz=320)
    add_train_args(p, epochs=5)
    p.add_argument("--backend", required=True,
                   help="NNIE, Tensorrt (also SNPE, PPLW8A16, Vitis, OPENVINO, Tengine_u8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the QAT fine-tuning (replaces lr0)")
    p.add_argument("--calib-batches", type=int, default=10, help="training batches for calibration")
    add_out_arg(p)
    p.set_defaults(func=run, cfg=None)


def run(args):
    """Run QAT."""
    from ..quant.stage import run_qat

    opts = options_from_args(args, "qat")
    run_qat(opts, args.backend, args.calib_batches, args.lr)
    return 0
