"""Metrics of a model on a dataset (:func:`evaluate_model`), and of a trained run (:func:`evaluate_checkpoint`).

seg: :class:`~vitsplit.evaluation.metrics.IoUMetric` over whole images or sliding windows
(:mod:`~vitsplit.evaluation.inference`); depth: :class:`~vitsplit.evaluation.metrics.DepthMetric`;
det: COCO mAP (:mod:`~vitsplit.evaluation.coco`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from ..data import build_dataset
from ..device import eval_autocast_dtype, resolve_device
from ..errors import UserError
from ..model import load_trained
from ..progress import NULL_PROGRESS, Progress
from ..ranges import COUNT, Range
from ..runlock import check_not_in_use
from .coco import coco_map
from .inference import same_size_batches, slide_inference
from .metrics import DepthMetric, IoUMetric, finite_or_none

# The numeric options' allowed values; the CLI checks the same table while parsing.
EVAL_RANGES: dict[str, Range] = {"stride": COUNT, "batch_size": COUNT}


@torch.no_grad()
def evaluate_model(
    model: Any,
    dataset: Any,
    task: str,
    *,
    mode: str = "whole",
    crop: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: Progress = NULL_PROGRESS,
) -> dict[str, Any]:
    """Metrics of ``model`` (eval mode) on ``dataset``.

    seg: mIoU/aAcc/mAcc/IoU (``mode`` whole or slide with ``crop`` and ``stride``; mmseg's default
    stride for a 512 crop is 341, i.e. 2/3 of the crop, which is the default here);
    depth: AbsRel, RMSE, delta1; det: bbox (and segm) mAP.
    """
    if mode not in ("whole", "slide"):
        raise UserError(f"unknown evaluation mode '{mode}': use whole or slide")
    if mode == "slide" and task != "seg":
        raise UserError("sliding-window evaluation is for segmentation; use --mode whole for det and depth")
    EVAL_RANGES["stride"].check("--stride", stride)
    EVAL_RANGES["batch_size"].check("--batch-size", batch_size)
    crop = int(crop or 0)
    stride = int(stride if stride is not None else max(1, (2 * crop) // 3))
    if mode == "slide" and stride > crop:
        raise UserError(
            f"--stride {stride} is larger than the {crop}-pixel window: pixels between windows would get "
            f"no prediction; use a stride of at most {crop}"
        )
    predicts = getattr(model, "num_classes", None)
    if task != "depth" and predicts is not None and predicts != dataset.num_classes:
        raise UserError(
            f"the model predicts {predicts} classes, but the data has {dataset.num_classes}: evaluate it on "
            "data labelled with the classes it was trained on (--data)"
        )
    device = torch.device(device)
    was_training = model.training
    model.eval()
    seg_metric = IoUMetric(dataset.num_classes, dataset.ignore_index) if task == "seg" else None
    depth_metric = DepthMetric() if task == "depth" else None
    targets: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    bar = progress.task(f"evaluate {task} ({mode})", len(dataset))
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        for group in same_size_batches(dataset, batch_size):
            images = torch.stack([it["image"] for it in group]).to(device)
            with amp:
                if task == "seg":
                    logits = (
                        slide_inference(model, images, dataset.num_classes, crop, stride)
                        if mode == "slide"
                        else model(images)
                    )
                    seg_metric.update(logits.float().argmax(1), torch.stack([it["seg"] for it in group]))
                elif task == "depth":
                    depth_metric.update(model(images).float(), torch.stack([it["depth"] for it in group]))
                else:
                    out = model(images)
                    for it, p in zip(group, out):
                        preds.append({k: v.float() if v.is_floating_point() else v for k, v in p.items()})
                        t = {
                            "image_id": int(it.get("index", len(targets))),
                            "height": images.shape[-2],
                            "width": images.shape[-1],
                            "boxes": it["boxes"].numpy(),
                            "labels": it["labels"].numpy(),
                        }
                        if getattr(dataset, "has_masks", False) and "masks" in it:
                            t["masks"] = it["masks"].numpy()
                        targets.append(t)
            bar.advance(len(group))
    finally:
        bar.close()
        model.train(was_training)
    if task == "seg":
        res = seg_metric.compute()
        res["IoU"] = finite_or_none(res["IoU"])
        res["class_names"] = list(getattr(dataset, "class_names", []))
    elif task == "depth":
        res = depth_metric.compute()
    else:
        with_masks = (
            bool(getattr(dataset, "has_masks", False))
            and all("masks" in t for t in targets)
            and all("masks" in p for p in preds)
        )
        res = coco_map(targets, preds, dataset.num_classes, with_masks)
    res["num_images"] = len(dataset)
    res["mode"] = mode
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}


def evaluate_checkpoint(
    path: Any,
    *,
    data: str | None = None,
    mode: str = "whole",
    stride: int | None = None,
    device: str = "auto",
    batch_size: int = 4,
    progress: Progress = NULL_PROGRESS,
) -> dict[str, Any]:
    """Metrics of a trained model (OUT or OUT/model.safetensors) on the val split of ``data``
    (default: the data it was trained on), at its training crop and in the precision its run
    evaluated in (:func:`vitsplit.device.eval_autocast_dtype`), so that it reproduces eval.json."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    check_not_in_use(folder, "evaluate it")  # a training run still writing there is not finished
    model, cfg = load_trained(path)
    dev = resolve_device(device)
    val = build_dataset(
        data or cfg.get("val_data") or cfg["data"],
        "val",
        task=cfg["task"],
        crop=cfg["crop"],
        augment=False,
        length=cfg.get("val_length") if data is None else None,
        seed=cfg["seed"],
    )
    model.to(dev)
    amp = eval_autocast_dtype(cfg.get("precision", "auto"), dev)  # the precision the run's own eval.json used
    return evaluate_model(
        model,
        val,
        cfg["task"],
        mode=mode,
        crop=cfg["crop"],
        stride=stride,
        batch_size=batch_size,
        device=dev,
        autocast_dtype=amp,
        progress=progress,
    )
