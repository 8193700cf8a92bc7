"""Training and evaluation engine.

- ``metrics``: box conversions, IoU, NMS, ``non_max_suppression``, COCO-equivalent mAP
  (``DetectionMetrics``) and COCO JSON export (``to_coco_json``).
- ``loss``: the YOLOv5 v6 loss (``ComputeLoss``) and ``scale_hyp_for_model``.

Import the submodules directly; this package imports nothing heavy on its own.
"""
