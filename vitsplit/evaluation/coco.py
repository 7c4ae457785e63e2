"""COCO mAP of detections: :func:`coco_map` builds a COCO ground truth from our targets and scores
detections with ``pycocotools.cocoeval.COCOeval`` (bbox, and segm when masks exist); AP in percent."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils  # noqa: PLC0415 - only detection needs pycocotools

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
        for j, (box, lab) in enumerate(
            zip(np.asarray(t["boxes"], np.float64).reshape(-1, 4), np.asarray(t["labels"]).reshape(-1))
        ):
            x1, y1, x2, y2 = (float(v) for v in box)
            ann = {
                "id": len(anns) + 1,
                "image_id": int(t["image_id"]),
                "category_id": int(lab),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": 0,
                "area": (x2 - x1) * (y2 - y1),
            }
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
            d = {
                "image_id": int(iid),
                "category_id": int(labels[j]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[j]),
            }
            if masks is not None:
                m = torch.as_tensor(masks[j]).detach().cpu().reshape(masks[j].shape[-2:]) > 0.5
                d["segmentation"] = _rle(m.numpy())
            out.append(d)
    return out


def coco_map(
    targets: list[dict[str, Any]], preds: list[dict[str, Any]], num_classes: int, with_masks: bool
) -> dict[str, float]:
    """bbox (and segm) AP, AP50, AP75 in percent through pycocotools' COCOeval."""
    from pycocotools.coco import COCO  # noqa: PLC0415 - only detection needs pycocotools (slow to import)
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = coco_ground_truth(targets, num_classes)
    results: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints; library code does not
        gt.createIndex()
        dets = coco_detections(preds, [int(t["image_id"]) for t in targets], with_masks)
        for kind in ("bbox", "segm") if with_masks else ("bbox",):
            if not dets or not gt.dataset["annotations"]:
                results.update(
                    {
                        f"{kind}_mAP": 0.0 if gt.dataset["annotations"] else float("nan"),
                        f"{kind}_mAP_50": 0.0 if gt.dataset["annotations"] else float("nan"),
                        f"{kind}_mAP_75": 0.0 if gt.dataset["annotations"] else float("nan"),
                    }
                )
                continue
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            s = ev.stats
            results.update(
                {
                    f"{kind}_mAP": float(s[0]) * 100,
                    f"{kind}_mAP_50": float(s[1]) * 100,
                    f"{kind}_mAP_75": float(s[2]) * 100,
                }
            )
    return results
