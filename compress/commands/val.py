"""``compress val``: P, R, mAP@0.5 and mAP@0.5:0.95 (COCO-equivalent) on a dataset split."""
from __future__ import annotations

from ..errors import UserError
from .common import add_model_args, add_out_arg, out_dir


def register(sub):
    """Add the ``val`` subcommand."""
    p = sub.add_parser("val", help="validate a detector: P, R, mAP@0.5, mAP@0.5:0.95 per class")
    add_model_args(p, imgsz=320)
    p.add_argument("--data", required=True, help="dataset data.yaml")
    p.add_argument("--task", default="val", choices=["val", "train"], help="which split")
    p.add_argument("--batch", "--batch-size", type=int, default=32)
    p.add_argument("--conf", "--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou", "--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="detections kept per image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-json", action="store_true", help="also write COCO JSON ground truth and predictions")
    add_out_arg(p)
    p.set_defaults(func=run)


def run(args):
    """Validate and write report.json (and COCO JSON with --save-json)."""
    from ..data.dataset import create_dataloader, load_data_yaml
    from ..engine.metrics import to_coco_json
    from ..engine.trainer import select_device
    from ..engine.validate import evaluate, metrics_table, torch_predictor
    from ..fileio import write_json
    from ..model.artifact import load_model
    from ..model.profile import check_imgsz, profile

    if not args.weights and not args.cfg:
        raise UserError("give --weights (artifact dir or .pt)")
    model = load_model(args.cfg, args.weights) if args.weights else load_model(args.cfg)
    data = load_data_yaml(args.data)
    if model.nc != data["nc"]:
        raise UserError(f"{args.data}: nc={data['nc']} but the model predicts {model.nc} classes")
    check_imgsz(model, args.imgsz)
    loader, _ = create_dataloader(data[args.task], args.imgsz, args.batch, augment=False, workers=args.workers,
                                  nc=data["nc"], prefix=f"{args.task}: ")
    device = select_device(args.device)
    res = evaluate(torch_predictor(model, device), loader, data["nc"], data["names"], args.conf, args.iou,
                   args.max_det, keep_records=args.save_json)
    print(metrics_table(res))
    out = out_dir(args, "val")
    rep = {"stage": "val", "weights": str(args.weights), "data": str(args.data), "imgsz": args.imgsz,
           "conf": args.conf, "iou": args.iou, **profile(model, args.imgsz),
           **{k: v for k, v in res.items() if k != "records"}}
    write_json(out / "report.json", rep)
    if args.save_json:
        gt, pred = out / "ground_truth.json", out / "predictions.json"
        to_coco_json(res["records"], gt, pred, names=data["names"])
        print(f"COCO JSON: {gt}, {pred}")
    print(f"results saved to {out}")
    return 0
