"""Evaluation: mIoU (mmseg semantics), whole/sliding-window inference, COCO mAP, depth errors.

- :class:`IoUMetric` follows MMSegmentation 0.20's ``intersect_and_union`` / ``total_intersect_and_union``:
  pixels whose label is ``ignore_index`` are dropped; per class, intersection, prediction area and
  label area are **summed over the whole dataset**, IoU = I / (P + L - I); a class with zero union
  gives NaN and is left out of the mean (``nanmean``); aAcc = sum(I) / sum(L). Values in percent.
- :func:`slide_inference` is mmseg's ``EncoderDecoder.slide_inference``: windows of ``crop`` at
  ``stride``, the last window in each direction moved back to end at the border, logits summed
  and divided by the per-pixel window count.
- :func:`coco_map` builds a COCO ground truth from our targets and scores detections with
  ``pycocotools.cocoeval.COCOeval`` (bbox, and segm when masks exist); AP in percent.
- :class:`DepthMetric`: AbsRel, RMSE, delta < 1.25 per image over valid pixels (gt > 0),
  averaged over images (the convention of Eigen et al. 2014 evaluation code as used by BTS/AdaBins).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .progress import NULL_PROGRESS, Progress


class IoUMetric:
    """Dataset-level IoU. ``update(pred, label)`` with integer tensors (B, H, W) or (H, W)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.area_intersect = torch.zeros(k, dtype=torch.float64)
        self.area_pred = torch.zeros(k, dtype=torch.float64)
        self.area_label = torch.zeros(k, dtype=torch.float64)

    def _hist(self, x: torch.Tensor) -> torch.Tensor:
        # torch.histc(bins=K, min=0, max=K-1) as mmseg: values outside [0, K-1] are not counted.
        x = x[(x >= 0) & (x < self.num_classes)]
        return torch.bincount(x, minlength=self.num_classes).to(torch.float64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        pred = pred.detach().cpu().long().reshape(-1)
        label = label.detach().cpu().long().reshape(-1)
        if pred.shape != label.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, label {label.numel()}")
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        inter = self._hist(pred[pred == label])
        self.area_intersect += inter
        self.area_pred += self._hist(pred)
        self.area_label += self._hist(label)

    def state(self) -> torch.Tensor:
        """(3, K) float64 sums, for an all-reduce under DDP."""
        return torch.stack([self.area_intersect, self.area_pred, self.area_label])

    def load_state(self, s: torch.Tensor) -> None:
        self.area_intersect, self.area_pred, self.area_label = (t.clone() for t in s.to(torch.float64))

    def compute(self) -> dict[str, Any]:
        union = self.area_pred + self.area_label - self.area_intersect
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = (self.area_intersect / union).numpy()  # 0/0 -> nan for a class absent from both
            acc = (self.area_intersect / self.area_label).numpy()
        total = float(self.area_label.sum())
        miou = float(np.nanmean(iou)) * 100 if np.isfinite(iou).any() else float("nan")
        return {
            "mIoU": miou,
            "aAcc": float(self.area_intersect.sum()) / total * 100 if total > 0 else float("nan"),
            "mAcc": float(np.nanmean(acc)) * 100 if np.isfinite(acc).any() else float("nan"),
            "IoU": [float(v) * 100 for v in iou],
        }


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's window grid: [(y1, y2, x1, x2)] covering (height, width) with ``crop`` windows."""
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def slide_inference(model: Any, images: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """images (B, 3, H, W) -> averaged logits (B, K, H, W); ``model(x)`` gives (B, K, h, w) at x's size."""
    b, _, h, w = images.shape
    logits = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        logits[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2]).float()
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


class DepthMetric:
    """Per-image AbsRel, RMSE, delta<1.25 on valid pixels (gt > 0), averaged over images."""

    def __init__(self) -> None:
        self.sums = {"AbsRel": 0.0, "RMSE": 0.0, "delta1": 0.0}
        self.count = 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: (B, H, W) or (B, 1, H, W) metres; images without a valid pixel are skipped."""
        pred = pred.detach().cpu().double().reshape(gt.shape[0], -1)
        gt = gt.detach().cpu().double().reshape(gt.shape[0], -1)
        for p, g in zip(pred, gt):
            v = g > 0
            if not bool(v.any()):
                continue
            p, g = p[v], g[v]
            self.sums["AbsRel"] += float(((p - g).abs() / g).mean())
            self.sums["RMSE"] += float(((p - g) ** 2).mean().sqrt())
            self.sums["delta1"] += float((torch.maximum(p / g, g / p) < 1.25).double().mean()) * 100
            self.count += 1

    def compute(self) -> dict[str, float]:
        n = self.count
        return {k: (v / n if n else float("nan")) for k, v in self.sums.items()} | {"images": n}


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def coco_ground_truth(targets: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """COCO dict from per-image targets {"image_id", "height", "width", "boxes" (N, 4) xyxy,
    "labels" (N,) 1..K, ["masks" (N, H, W)]}. Area = mask area when masks exist, else box area."""
    images, anns = [], []
    for t in targets:
        images.append({"id": int(t["image_id"]), "height": int(t["height"]), "width": int(t["width"])})
        masks = t.get("masks")
        for j, (box, lab) in enumerate(zip(np.asarray(t["boxes"], np.float64).reshape(-1, 4), np.asarray(t["labels"]).reshape(-1))):
            x1, y1, x2, y2 = (float(v) for v in box)
            ann = {"id": len(anns) + 1, "image_id": int(t["image_id"]), "category_id": int(lab),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "area": (x2 - x1) * (y2 - y1)}
            if masks is not None:
                m = np.asarray(masks[j])
                ann["segmentation"] = _rle(m)
                ann["area"] = float(m.sum())
            anns.append(ann)
    cats = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_detections(preds: list[dict[str, Any]], image_ids: list[int], with_masks: bool) -> list[dict[str, Any]]:
    """COCO result list from torchvision-style predictions (masks (N, 1, H, W) probabilities, thresholded at 0.5)."""
    out = []
    for iid, p in zip(image_ids, preds):
        boxes = np.asarray(torch.as_tensor(p["boxes"]).detach().cpu(), np.float64).reshape(-1, 4)
        scores = np.asarray(torch.as_tensor(p["scores"]).detach().cpu(), np.float64).reshape(-1)
        labels = np.asarray(torch.as_tensor(p["labels"]).detach().cpu()).reshape(-1)
        masks = p.get("masks") if with_masks else None
        for j in range(len(boxes)):
            x1, y1, x2, y2 = boxes[j]
            d = {"image_id": int(iid), "category_id": int(labels[j]), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[j])}
            if masks is not None:
                m = torch.as_tensor(masks[j]).detach().cpu().reshape(masks[j].shape[-2:]) > 0.5
                d["segmentation"] = _rle(m.numpy())
            out.append(d)
    return out


def coco_map(targets: list[dict[str, Any]], preds: list[dict[str, Any]], num_classes: int, with_masks: bool) -> dict[str, float]:
    """bbox (and segm) AP, AP50, AP75 in percent through pycocotools' COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = coco_ground_truth(targets, num_classes)
    results: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints; library code does not
        gt.createIndex()
        dets = coco_detections(preds, [int(t["image_id"]) for t in targets], with_masks)
        for kind in ("bbox", "segm") if with_masks else ("bbox",):
            if not dets or not gt.dataset["annotations"]:
                results.update({f"{kind}_mAP": 0.0 if gt.dataset["annotations"] else float("nan"),
                                f"{kind}_mAP_50": 0.0 if gt.dataset["annotations"] else float("nan"),
                                f"{kind}_mAP_75": 0.0 if gt.dataset["annotations"] else float("nan")})
                continue
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            s = ev.stats
            results.update({f"{kind}_mAP": float(s[0]) * 100, f"{kind}_mAP_50": float(s[1]) * 100,
                            f"{kind}_mAP_75": float(s[2]) * 100})
    return results


def _batches(dataset: Any, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive items grouped while their image sizes match (val images may differ in size)."""
    group: list[dict[str, Any]] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if group and (len(group) == batch_size or group[0]["image"].shape != item["image"].shape):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


@torch.no_grad()
def evaluate_model(model: Any, dataset: Any, task: str, *, mode: str = "whole", crop: int | None = None,
                   stride: int | None = None, batch_size: int = 4, device: torch.device | str = "cpu",
                   autocast_dtype: torch.dtype | None = None, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Metrics of ``model`` (eval mode) on ``dataset``.

    seg: mIoU/aAcc/mAcc/IoU (``mode`` whole or slide with ``crop`` and ``stride``; mmseg's default
    stride for a 512 crop is 341, i.e. 2/3 of the crop, which is the default here);
    depth: AbsRel, RMSE, delta1; det: bbox (and segm) mAP.
    """
    from .errors import UserError

    if mode not in ("whole", "slide"):
        raise UserError(f"unknown evaluation mode '{mode}': use whole or slide")
    if mode == "slide" and task != "seg":
        raise UserError("sliding-window evaluation is for segmentation; use --mode whole for det and depth")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    crop = int(crop or 0)
    stride = int(stride or max(1, (2 * crop) // 3))
    seg_metric = IoUMetric(dataset.num_classes, dataset.ignore_index) if task == "seg" else None
    depth_metric = DepthMetric() if task == "depth" else None
    targets: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    bar = progress.task(f"evaluate {task} ({mode})", len(dataset))
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        for group in _batches(dataset, batch_size):
            images = torch.stack([it["image"] for it in group]).to(device)
            with amp:
                if task == "seg":
                    logits = (slide_inference(model, images, dataset.num_classes, crop, stride) if mode == "slide"
                              else model(images))
                    seg_metric.update(logits.float().argmax(1), torch.stack([it["seg"] for it in group]))
                elif task == "depth":
                    depth_metric.update(model(images).float(), torch.stack([it["depth"] for it in group]))
                else:
                    out = model(images)
                    for it, p in zip(group, out):
                        preds.append({k: v.float() if v.is_floating_point() else v for k, v in p.items()})
                        t = {"image_id": int(it.get("index", len(targets))), "height": images.shape[-2],
                             "width": images.shape[-1], "boxes": it["boxes"].numpy(), "labels": it["labels"].numpy()}
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
        with_masks = bool(getattr(dataset, "has_masks", False)) and all("masks" in t for t in targets) and \
            all("masks" in p for p in preds)
        res = coco_map(targets, preds, dataset.num_classes, with_masks)
    res["num_images"] = len(dataset)
    res["mode"] = mode
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}


def evaluate_checkpoint(path: Any, *, data: str | None = None, mode: str = "whole", stride: int | None = None,
                        device: str = "auto", batch_size: int = 4, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Metrics of a trained model (OUT or OUT/model.safetensors) on the val split of ``data``
    (default: the data it was trained on), at its training crop."""
    from .data import build_dataset
    from .train import _Dist, load_trained, resolve_device

    model, cfg = load_trained(path)
    dev = resolve_device(device, _Dist())
    val = build_dataset(data or cfg.val_data or cfg.data, "val", task=cfg.task, crop=cfg.crop, augment=False,
                        length=cfg.val_length if data is None else None, seed=cfg.seed)
    model.to(dev)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    return evaluate_model(model, val, cfg.task, mode=mode, crop=cfg.crop, stride=stride, batch_size=batch_size,
                          device=dev, autocast_dtype=amp, progress=progress)


def finite_or_none(values: Iterable[float]) -> list[float | None]:
    """JSON-safe list: NaN -> None (a class absent from the data)."""
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in values]
