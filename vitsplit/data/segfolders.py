"""Semantic-segmentation folders: ADE20K (mmseg layout), Cityscapes (labelTrainIds), plain folders.

Layouts (``split`` is ``train`` or ``val``):

- ``ade20k:DIR``: ``DIR/images/{training,validation}/*.jpg`` with ``DIR/annotations/{training,
  validation}/<stem>.png``. ``reduce_zero_label`` as mmseg: 0 ("other") -> 255, v -> v - 1, so the
  150 classes are 0..149 (raw 255 stays ignore); other raw values above 150 are an error.
- ``cityscapes:DIR``: ``DIR/leftImg8bit/{train,val}/CITY/<id>_leftImg8bit.png`` with
  ``DIR/gtFine/{train,val}/CITY/<id>_gtFine_labelTrainIds.png`` (19 classes 0..18, 255 ignore;
  made by cityscapesScripts' ``createTrainIdLabelImgs``).
- ``folder:DIR``: ``DIR/images/`` and ``DIR/masks/`` with matching stems (masks are single-channel
  PNGs of class indices, 255 ignore). With ``images/train`` + ``images/val`` (and the same under
  ``masks/``) those are the splits; without them the images sorted by stem are split so that every
  10th one (positions 0, 10, 20, ...) is val and the rest train. Classes: ``DIR/classes.txt`` (one
  name per line) if present, else 1 + the largest label value found in all masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .labels import IGNORE_INDEX
from .readers import check_same_size, list_images, read_image, read_label

ADE20K_CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed ",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)  # mmseg ADE20KDataset.METAINFO["classes"] (objectInfo150.txt order)
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)


@dataclass
class SegFolderSource:
    """Image/label pairs of one split: ``load(i)`` -> {"image": (H, W, 3) uint8, "seg": (H, W) uint8}."""

    pairs: list[tuple[Path, Path]]
    num_classes: int
    class_names: list[str]
    reduce_zero_label: bool = False

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = read_label(label_path)
        check_same_size(image, label, image_path, label_path)
        return {"image": image, "seg": self.to_train_labels(label, label_path)}

    def to_train_labels(self, label: np.ndarray, label_path: Path) -> np.ndarray:
        """Raw label map -> (H, W) uint8 in 0..num_classes-1 or 255; values out of range raise UserError."""
        if self.reduce_zero_label:  # mmseg: 0 -> 255, v -> v - 1, and raw 255 stays ignore
            bad = (label != IGNORE_INDEX) & ((label < 0) | (label > self.num_classes))
            if bad.any():
                raise UserError(
                    f"label map {label_path} has value {int(label[bad][0])} outside "
                    f"0..{self.num_classes} (0 = other, 255 = ignore); is this an ADE20K annotation?"
                )
            label = np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            value = int(label[bad][0])
            raise UserError(
                f"label map {label_path} has value {value} outside 0..{self.num_classes - 1} "
                f"(255 = ignore); fix the mask or the class list"
            )
        return label.astype(np.uint8)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"missing {what} folder {path}; check the data spec's DIR")
    return path


def _pair_by_stem(images: list[Path], label_dir: Path, label_name) -> list[tuple[Path, Path]]:
    pairs = []
    for image in images:
        label = label_dir / label_name(image)
        if not label.is_file():
            raise UserError(f"no label map for image {image}: expected {label}")
        pairs.append((image, label))
    return pairs


def ade20k(root: Path, split: str) -> SegFolderSource:
    """ADE20K in mmseg's layout (see the module docstring)."""
    sub = {"train": "training", "val": "validation"}[split]
    image_dir = _require_dir(root / "images" / sub, "ADE20K image")
    label_dir = _require_dir(root / "annotations" / sub, "ADE20K annotation")
    images = list_images(image_dir)
    if not images:
        raise UserError(f"empty split folder {image_dir}: no images found")
    pairs = _pair_by_stem(images, label_dir, lambda p: p.stem + ".png")
    return SegFolderSource(pairs, 150, list(ADE20K_CLASSES), reduce_zero_label=True)


def cityscapes(root: Path, split: str) -> SegFolderSource:
    """Cityscapes fine annotations as train ids (see the module docstring)."""
    image_root = _require_dir(root / "leftImg8bit" / split, "Cityscapes image")
    label_root = _require_dir(root / "gtFine" / split, "Cityscapes gtFine")
    suffix = "_leftImg8bit.png"
    images = sorted(image_root.glob(f"*/*{suffix}"))
    if not images:
        raise UserError(f"empty split folder {image_root}: no CITY/*{suffix} images found")
    pairs = []
    for image in images:
        label = label_root / image.parent.name / (image.name[: -len(suffix)] + "_gtFine_labelTrainIds.png")
        if not label.is_file():
            raise UserError(
                f"no label map for image {image}: expected {label} (make it with "
                "cityscapesScripts' createTrainIdLabelImgs)"
            )
        pairs.append((image, label))
    return SegFolderSource(pairs, 19, list(CITYSCAPES_CLASSES))


def folder(root: Path, split: str) -> SegFolderSource:
    """A plain images/ + masks/ folder (see the module docstring)."""
    image_root = _require_dir(root / "images", "image")
    mask_root = _require_dir(root / "masks", "mask")
    if (image_root / "train").is_dir() or (image_root / "val").is_dir():
        image_dir = _require_dir(image_root / split, f"{split} image")
        mask_dir = _require_dir(mask_root / split, f"{split} mask")
        images = list_images(image_dir)
        if not images:
            raise UserError(f"empty split folder {image_dir}: no images found")
        pairs = _pair_by_stem(images, mask_dir, lambda p: p.stem + ".png")
        all_masks = [
            m for s in ("train", "val") if (mask_root / s).is_dir() for m in sorted((mask_root / s).glob("*.png"))
        ]
    else:
        images = list_images(image_root)
        if len(images) < 2:
            raise UserError(
                f"{image_root} holds {len(images)} image(s); a folder dataset needs at least 2 "
                "(or images/train and images/val subfolders)"
            )
        all_pairs = _pair_by_stem(images, mask_root, lambda p: p.stem + ".png")
        pairs = [p for i, p in enumerate(all_pairs) if (i % 10 == 0) == (split == "val")]
        all_masks = [m for _, m in all_pairs]
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if not 1 <= len(names) <= 255:
            raise UserError(f"{names_file} must list 1..255 class names, one per line (found {len(names)})")
    else:
        top = -1
        for mask in all_masks:
            values = np.unique(read_label(mask))
            values = values[values != IGNORE_INDEX]
            if len(values):
                if values[0] < 0 or values[-1] > 254:
                    raise UserError(f"label map {mask} has values outside 0..254 (255 = ignore)")
                top = max(top, int(values[-1]))
        if top < 0:
            raise UserError(f"no labelled pixels in the masks under {mask_root}; add classes.txt or fix the masks")
        names = [f"class_{i}" for i in range(top + 1)]
    return SegFolderSource(pairs, len(names), names)
