"""Evaluation: metrics (mIoU, depth errors, COCO mAP), slide inference, and evaluating a model or a run."""

from .coco import coco_detections, coco_ground_truth, coco_map
from .evaluate import evaluate_checkpoint, evaluate_model
from .inference import slide_inference, slide_windows
from .metrics import DepthMetric, IoUMetric, finite_or_none

__all__ = [
    "DepthMetric",
    "IoUMetric",
    "coco_detections",
    "coco_ground_truth",
    "coco_map",
    "evaluate_checkpoint",
    "evaluate_model",
    "finite_or_none",
    "slide_inference",
    "slide_windows",
]
