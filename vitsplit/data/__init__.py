"""Datasets for ViT-Split and the CKA analysis: ``build_dataset(spec, split, task=..., crop=...)``.

Specs (``vitsplit.data.spec``): ``synthetic`` (embedded procedural scenes, ``vitsplit.data.synthetic``),
``ade20k:DIR``, ``cityscapes:DIR``, ``folder:DIR`` (``segfolders``), ``coco:ANNOTATIONS.json:IMAGE_DIR``
(``coco``). Items and attributes are described in ``dataset`` and ``transforms``; transforms are mmseg's ADE20K
pipelines (``transforms``); per-item seeding and ``set_epoch`` are described in ``dataset``.

Class conventions: seg classes are 0..num_classes-1 with ``IGNORE_INDEX`` (255) ignore (synthetic and coco seg: 0 is
"background" and objects are 1..K, so num_classes = K + 1); det labels are 1..num_classes (K
object classes, background excluded). Synthetic scenes are ``size`` x ``size`` (default: ``crop``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..ops.imagenet import IMAGENET_MEAN, IMAGENET_STD
from .coco import CocoSource
from .dataset import SeedDataset
from .labels import IGNORE_INDEX, TASKS
from .segfolders import ade20k, cityscapes, folder
from .spec import DataSpec, parse_spec
from .synthetic import SyntheticScenes

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "build_dataset",
    "collate",
    "denormalize",
    "parse_spec",
    "DataSpec",
    "SeedDataset",
    "SyntheticScenes",
]

SYNTHETIC_LENGTH = {"train": 10_000, "val": 256}


def build_dataset(
    spec: str,
    split: str,
    *,
    task: str,
    crop: int,
    augment: bool | None = None,
    length: int | None = None,
    seed: int = 0,
) -> SeedDataset:
    """The dataset named by ``spec`` for ``split`` ("train" | "val") and ``task`` ("seg" | "det" | "depth").

    ``augment`` defaults to ``split == "train"``; ``length`` overrides ``len()`` (synthetic: the
    number of scenes, default 10000 train / 256 val; real data: wraps or truncates the file list).
    """
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', got {split!r}")
    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(crop, bool) or not isinstance(crop, numbers.Integral) or crop < 16:
        raise UserError(f"crop must be an integer >= 16 px, got {crop!r}")
    if length is not None and length < 1:
        raise UserError(f"dataset length must be >= 1, got {length}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    augment = split == "train" if augment is None else augment
    parsed = parse_spec(spec)
    common = dict(task=task, split=split, crop=crop, augment=augment, seed=seed)

    if parsed.kind == "synthetic":
        opts = parsed.options
        size = opts.get("size", crop)
        n = length if length is not None else opts.get("length", SYNTHETIC_LENGTH[split])
        scenes = SyntheticScenes(
            size=(size, size),
            num_classes=opts.get("classes", 8),
            max_objects=opts.get("objects", 6),
            length=n,
            seed=seed,
            split=split,
            zoom=opts.get("zoom", 1),
        )
        if opts.get("rescale", 1) not in (0, 1):
            raise UserError(f"synthetic option rescale must be 0 or 1, got {opts['rescale']} in {spec!r}")
        # rescale=0: scenes are drawn at the training size, so the random 0.5-2x rescale only shrinks or
        # enlarges them away from the validation scale; without it they train at the scale they are evaluated at
        ratio = (0.5, 2.0) if opts.get("rescale", 1) else (1.0, 1.0)
        if task == "det":
            return SeedDataset(
                scenes,
                **common,
                num_classes=scenes.num_classes,
                class_names=scenes.class_names,
                has_masks=True,
                has_depth=True,
                recompute_boxes=True,
                ratio_range=ratio,
            )
        return SeedDataset(
            scenes,
            **common,
            num_classes=scenes.num_classes + 1,
            class_names=["background", *scenes.class_names],
            has_masks=True,
            has_depth=True,
            ratio_range=ratio,
        )

    if task == "depth":
        raise UserError(f"data spec {spec!r} has no depth maps; depth training needs 'synthetic'")
    if parsed.kind == "coco":
        source = CocoSource(parsed.annotations, parsed.root, split, semantic=task == "seg")
        if task == "seg":
            return SeedDataset(
                source,
                **common,
                num_classes=source.num_classes + 1,
                length=length,
                class_names=["background", *source.class_names],
                has_masks=True,
                has_depth=False,
            )
        return SeedDataset(
            source,
            **common,
            num_classes=source.num_classes,
            class_names=source.class_names,
            has_masks=source.has_masks,
            has_depth=False,
            length=length,
        )
    if task == "det":
        raise UserError(
            f"data spec {spec!r} has no instance annotations; detection needs "
            "'coco:ANNOTATIONS.json:IMAGE_DIR' or 'synthetic'"
        )
    make = {"ade20k": ade20k, "cityscapes": cityscapes, "folder": folder}[parsed.kind]
    source = make(parsed.root, split)
    return SeedDataset(
        source,
        **common,
        num_classes=source.num_classes,
        class_names=source.class_names,
        has_masks=False,
        has_depth=False,
        length=length,
    )


def collate(items: list[dict]) -> dict:
    """Batch items: ``image`` (B, 3, H, W), ``seg`` (B, H, W), ``depth`` (B, H, W), ``index`` (B,)
    int64; det fields (``boxes``, ``labels``, ``masks``) stay lists. Items of different sizes are
    padded bottom/right to the largest (image 0, seg ``IGNORE_INDEX``, depth 0, masks 0); boxes are unchanged."""
    if not items:
        raise ValueError("collate needs at least one item")
    hmax = max(it["image"].shape[-2] for it in items)
    wmax = max(it["image"].shape[-1] for it in items)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return F.pad(t, (0, wmax - t.shape[-1], 0, hmax - t.shape[-2]), value=value)

    batch: dict = {"image": torch.stack([pad(it["image"], 0.0) for it in items])}
    if all("seg" in it for it in items):
        batch["seg"] = torch.stack([pad(it["seg"], IGNORE_INDEX) for it in items])
    if all("depth" in it for it in items):
        batch["depth"] = torch.stack([pad(it["depth"], 0.0) for it in items])
    for key in ("boxes", "labels"):
        if all(key in it for it in items):
            batch[key] = [it[key] for it in items]
    if all("masks" in it for it in items):
        batch["masks"] = [pad(it["masks"], 0) for it in items]
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
    return batch


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: (3, H, W) or (B, 3, H, W) -> same shape in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)
