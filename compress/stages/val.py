"""The ``val`` stage: P, R, mAP@0.5 and mAP@0.5:0.95 of a model on a dataset split."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..options import DataInput, DeviceOptions, ModelInput, OutputOptions, option
from .base import METRICS, DataInfo, Report, load_input_model, output_dir, source_name


@dataclass(kw_only=True)
class ValOptions(ModelInput, DataInput, DeviceOptions, OutputOptions):
    """What ``compress val`` takes."""

    data: str | None = option(None, "dataset data.yaml", required=True, recipe=False)
    task: str = option("val", "which split", choices=("val", "train", "test"))
    batch: int = option(32, "batch size", flags=("--batch-size",))
    conf: float = option(0.001, "NMS confidence threshold, in [0, 1]", flags=("--conf-thres",))
    iou: float = option(0.6, "NMS IoU threshold, in [0, 1]", flags=("--iou-thres",))
    max_det: int = option(300, "detections kept per image")
    save_json: bool = option(False, "also write COCO JSON ground truth and predictions")
    metric: str = option("coco", "the mAP definition the table and the report's map50/map show: coco "
                                 "(pycocotools-exact) or ultralytics (YOLOv5 val.py: IoU-ordered matching, trapezoid "
                                 "AP); report.json always holds both", choices=("coco", "ultralytics"))
    rect: bool = option(False, "rectangular batches as YOLOv5 val.py builds them (images in aspect-ratio order, each "
                               "batch letterboxed to its own shape, padded by half a stride); with --metric "
                               "ultralytics this reproduces val.py's numbers")

    def check(self):
        super().check()
        self.require_range("conf", 0, 1, what="a confidence threshold")
        self.require_range("iou", 0, 1, what="an IoU threshold")
        self.require_positive("batch", "max_det")


def preflight(o: ValOptions, model, info: DataInfo) -> None:
    """The dataset has the split asked for and the model fits it."""
    if o.task not in info.sizes:
        raise UserError(f"{info.source}: --task {o.task}: the dataset has no '{o.task}' split")
    info.check_model(model)


def run(o: ValOptions) -> Report:
    """Validate, print the per-class table and write report.json (and COCO JSON with --save-json)."""
    from ..data.dataset import create_dataloader, load_data_yaml
    from ..engine.device import select_device
    from ..engine.metrics import to_coco_json
    from ..engine.validate import evaluate, metrics_table, select_metric, torch_predictor
    from ..fileio import write_json
    from ..model.profile import profile

    o.validate()
    data = load_data_yaml(o.data)
    model = load_input_model(o, data)
    preflight(o, model, DataInfo.of(data))
    imgsz = o.resolved_imgsz()
    out = output_dir(o, "val")
    stride = int(max(model.stride.tolist()))
    loader, _ = create_dataloader(data[o.task], imgsz, o.batch, augment=False, workers=o.workers, nc=data["nc"],
                                  prefix=f"{o.task}: ", rect=o.rect, pad=0.5 if o.rect else 0.0, stride=stride)
    res = evaluate(torch_predictor(model, select_device(o.device)), loader, data["nc"], data["names"], o.conf,
                   o.iou, o.max_det, keep_records=o.save_json)
    chosen = select_metric(res, o.metric)
    print(metrics_table(chosen))
    print(f"mAP: {METRICS[o.metric]}{', rectangular batches' if o.rect else ''}; NMS conf {o.conf:g}, iou {o.iou:g}")
    prof = profile(model, imgsz)
    rep = Report(stage="val", params=prof["params"], gflops=prof["gflops"], imgsz=imgsz, parent=source_name(o),
                 options=o.to_dict() | {"imgsz": imgsz},
                 details={"data": str(o.data), "task": o.task, "rect": o.rect, "nms_conf": o.conf, "nms_iou": o.iou,
                          "f1_conf": chosen.get("f1_conf"), "images": chosen.get("images"),
                          "instances": chosen.get("instances"), "per_class": chosen.get("per_class")})
    rep.set_metrics(res, o.metric)
    write_json(out / "report.json", rep.to_dict())
    if o.save_json:
        gt, pred = out / "ground_truth.json", out / "predictions.json"
        to_coco_json(res["records"], gt, pred, names=data["names"])
        print(f"COCO JSON: {gt}, {pred}")
    print(f"results saved to {out}")
    return rep
