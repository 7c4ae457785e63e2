"""Dense metrics: mIoU (MMSegmentation semantics) and depth errors.

- :class:`IoUMetric` follows MMSegmentation 0.20's ``intersect_and_union`` / ``total_intersect_and_union``:
  pixels whose label is ``ignore_index`` are dropped; per class, intersection, prediction area and
  label area are **summed over the whole dataset**, IoU = I / (P + L - I); a class with zero union
  gives NaN and is left out of the mean (``nanmean``); aAcc = sum(I) / sum(L). Values in percent.
- :class:`DepthMetric`: AbsRel, RMSE, delta < 1.25 per image over valid pixels (gt > 0),
  averaged over images (the convention of Eigen et al. 2014 evaluation code as used by BTS/AdaBins).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from ..data.labels import IGNORE_INDEX


class IoUMetric:
    """Dataset-level IoU. ``update(pred, label)`` with integer tensors (B, H, W) or (H, W)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
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


def finite_or_none(values: Iterable[float]) -> list[float | None]:
    """JSON-safe list: NaN -> None (a class absent from the data)."""
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in values]
