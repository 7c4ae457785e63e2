"""COCO-format instance annotations (spec ``coco:ANNOTATIONS.json:IMAGE_DIR``), read with pycocotools.

- Category ids, sorted, map to contiguous labels 1..K (0 is background, torchvision convention);
  ``class_names[k - 1]`` is the name of label k.
- Boxes: COCO ``[x, y, w, h]`` -> xyxy pixels; annotations with ``iscrowd=1``, with w or h < 1, or
  whose mask rasterises to nothing are skipped (as mmdet's CocoDataset does).
- Masks: polygons and RLE through ``COCO.annToMask``; ``has_masks`` is False when some annotation
  has no ``segmentation`` (then boxes only).
- The train split drops images without a usable annotation (mmdet ``filter_empty_gt``); val keeps all.
- Task ``seg``: a semantic map is rasterised from the instances (0 background, 1..K, larger
  instances first so smaller ones stay visible; crowd regions outside them 255 = ignore).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from .labels import IGNORE_INDEX
from .readers import read_image


def check_instances(data: object, path: Path) -> None:
    """Refuse a COCO instances file that pycocotools would index wrongly or fail on later: every image
    needs a unique integer ``id`` and a ``file_name``; every annotation an integer ``image_id``, a
    known ``category_id`` and a ``bbox`` of four finite numbers ``[x, y, w, h]``."""
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise UserError(f"{path} is not a COCO instances file (needs lists images, annotations, categories)")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise UserError(f"category #{i} in {path} has no integer 'id'; fix the annotation file")
    cats = {c["id"] for c in data["categories"]}
    image_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            raise UserError(f"image #{i} in {path} lacks an integer 'id' or a 'file_name'; fix the annotation file")
        if img["id"] in image_ids:
            raise UserError(f"image id {img['id']} appears twice in {path}; image ids must be unique")
        image_ids.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        name = f"annotation {ann.get('id', '#' + str(i))}" if isinstance(ann, dict) else f"annotation #{i}"
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int):
            raise UserError(f"{name} in {path} has no integer 'image_id'; fix the annotation file")
        if ann.get("category_id") not in cats:
            raise UserError(f"{name} in {path} has unknown category_id {ann.get('category_id')}")
        box = ann.get("bbox")
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise UserError(
                f"{name} in {path} has no 'bbox' of four numbers [x, y, w, h] (found {box!r}); fix the annotation file"
            )


class CocoSource:
    """One COCO annotation file as a list of samples: ``load(i)`` -> image, boxes, labels[, masks][, seg]."""

    def __init__(self, annotations: Path, image_dir: Path, split: str, semantic: bool = False):
        from pycocotools.coco import COCO  # noqa: PLC0415 - pycocotools is slow to import; only coco: specs need it

        if not annotations.is_file():
            raise UserError(f"COCO annotation file not found: {annotations}")
        if not image_dir.is_dir():
            raise UserError(f"COCO image folder not found: {image_dir}")
        try:
            data = json.loads(annotations.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read COCO annotation file {annotations} ({exc})") from None
        check_instances(data, annotations)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.annotations, self.image_dir, self.semantic = annotations, image_dir, semantic
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        if not cats:
            raise UserError(f"{annotations} lists no categories")
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.num_classes = len(cats)
        if semantic and self.num_classes > 254:
            raise UserError(f"{annotations} has {self.num_classes} categories; semantic maps hold at most 254")
        self.has_masks = all(ann.get("segmentation") for ann in data["annotations"] if not ann.get("iscrowd", 0))
        ids = sorted(self.coco.imgs)
        if split == "train":
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
        if not ids:
            raise UserError(f"{annotations} has no images{' with usable annotations' if split == 'train' else ''}")
        self.image_ids = ids

    @staticmethod
    def _usable(ann: dict) -> bool:
        x, y, w, h = ann["bbox"]
        return not ann.get("iscrowd", 0) and w >= 1 and h >= 1 and ann.get("area", w * h) > 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, index: int) -> dict:
        info = self.coco.imgs[self.image_ids[index]]
        path = self.image_dir / info["file_name"]
        image = read_image(path)
        h, w = image.shape[:2]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise UserError(
                f"size mismatch: image {path} is {w}x{h} but {self.annotations} says {info['width']}x{info['height']}"
            )
        boxes, labels, masks, crowd = [], [], [], []
        for ann in self.coco.imgToAnns.get(info["id"], []):
            if ann.get("iscrowd", 0):
                if self.semantic and ann.get("segmentation"):
                    crowd.append(self.coco.annToMask(ann))
                continue
            if not self._usable(ann):
                continue
            if self.has_masks:
                m = self.coco.annToMask(ann)
                if not m.any():
                    continue
                masks.append(m)
            x, y, bw, bh = ann["bbox"]
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.cat_to_label[ann["category_id"]])
        out = {
            "image": image,
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
        }
        if self.has_masks:
            out["masks"] = np.stack(masks).astype(np.uint8) if masks else np.zeros((0, h, w), np.uint8)
        if self.semantic:
            out["seg"] = self._semantic(out, crowd, h, w)
        return out

    def _semantic(self, sample: dict, crowd: list[np.ndarray], h: int, w: int) -> np.ndarray:
        """(H, W) uint8 map: 0 background, label per instance (largest painted first), crowd 255."""
        seg = np.zeros((h, w), np.uint8)
        if "masks" not in sample:
            raise UserError(f"{self.annotations} has annotations without segmentation; use task det")
        masks, labels = sample["masks"], sample["labels"]
        for i in np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable"):
            seg[masks[i] > 0] = labels[i]
        for m in crowd:  # crowd regions not covered by a counted instance are ignored
            seg[(m > 0) & (seg == 0)] = IGNORE_INDEX
        return seg
