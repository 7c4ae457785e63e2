"""The torch Dataset around a sample source: transforms, per-item seeding, tensors.

Seeding (the trainer's exact resume depends on it): item ``index`` in epoch ``e`` is augmented with
``numpy.random.default_rng(SeedSequence(seed, spawn_key=(0xA06, split_id, e, index)))``. The epoch
is dataset state set with :meth:`SeedDataset.set_epoch` (call it before creating each epoch's
DataLoader iterator; workers copy the dataset when the iterator is created, so do not use
``persistent_workers``), or passed explicitly to :meth:`SeedDataset.get`. Nothing depends on
worker ids, global RNGs or call order, so an item is a pure function of (seed, split, epoch, index).
Data *order* is the sampler's job (seed a ``torch.Generator`` with the same seed and epoch).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .labels import IGNORE_INDEX
from .transforms import eval_pipeline, train_pipeline

_SPLIT_IDS = {"train": 0, "val": 1}
# Scenes whose mean log-depth starts the depth head (SeedDataset.mean_log_depth): the synthetic scenes'
# per-scene mean log-depth has an SD of 0.21 (measured on the demo's scenes), so 64 give the mean to
# about 0.03 (3 % in depth), far inside the scenes' own 2.5-14.5 m spread.
DEPTH_PRIOR_ITEMS = 64
DET_KEYS = ("boxes", "labels", "masks")


class SampleSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> dict: ...


class SeedDataset(Dataset):
    """Items (every dataset's layout; :func:`vitsplit.data.collate` batches them): ``image`` (3, H, W) float32
    ImageNet-normalised;
    ``seg`` (H, W) int64 (``IGNORE_INDEX`` = 255 ignore) and ``depth`` (H, W) float32 (0 invalid) when the source has
    them; for ``task="det"`` also ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64 in 1..K and
    ``masks`` (N, H, W) uint8 (when ``has_masks``); ``index`` int.

    ``length``: ``len()``; item i reads source sample ``i % len(source)`` (so a length above the
    source's size repeats it, below truncates it). With ``augment`` the mmseg train pipeline runs
    (output crop x crop; ``ratio_range`` is its random rescale, mmseg's (0.5, 2.0) by default), else the
    test pipeline ``eval_pipeline`` (keep-ratio resize to scale (4 * crop, crop)).
    """

    def __init__(
        self,
        source: SampleSource,
        *,
        task: str,
        split: str,
        crop: int,
        augment: bool,
        seed: int,
        num_classes: int,
        class_names: list[str],
        has_masks: bool,
        has_depth: bool,
        length: int | None = None,
        recompute_boxes: bool = False,
        ratio_range: tuple[float, float] = (0.5, 2.0),
    ):
        self.source, self.task, self.split, self.crop = source, task, split, crop
        self.augment, self.seed = augment, seed
        self.num_classes, self.class_names = num_classes, class_names
        self.has_masks, self.has_depth = has_masks, has_depth
        self.ignore_index = IGNORE_INDEX
        self.length = len(source) if length is None else length
        self.recompute_boxes = recompute_boxes
        self.ratio_range = ratio_range
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def mean_log_depth(self, items: int = DEPTH_PRIOR_ITEMS) -> float:
        """Mean of log(depth) over the valid pixels (depth > 0) of the first ``items`` scenes, as the
        source stores them (no augmentation): the depth head's starting log-depth."""
        if not self.has_depth:
            raise UserError("this dataset has no depth maps")
        total, count = 0.0, 0
        for i in range(min(items, len(self.source))):
            depth = np.asarray(self.source.load(i)["depth"], dtype=np.float64)
            valid = depth[depth > 0]
            total, count = total + float(np.log(valid).sum()), count + valid.size
        if count == 0:
            raise UserError(f"the first {items} scenes hold no valid depth pixel (depth > 0)")
        return total / count

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (see the module docstring)."""
        self.epoch = int(epoch)

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        ss = np.random.SeedSequence(self.seed, spawn_key=(0xA06, _SPLIT_IDS[self.split], int(epoch), int(index)))
        return np.random.default_rng(ss)

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, epoch: int | None = None) -> dict:
        """Item ``index`` as augmented in ``epoch`` (default: the epoch set by :meth:`set_epoch`)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        sample = self.source.load(index % len(self.source))
        sample = {
            k: v for k, v in sample.items() if k in ("image", "seg", "depth") or (self.task == "det" and k in DET_KEYS)
        }
        if self.augment:
            rng = self.rng(index, self.epoch if epoch is None else epoch)
            sample = train_pipeline(
                sample, self.crop, rng, recompute_boxes=self.recompute_boxes, ratio_range=self.ratio_range
            )
        else:
            sample = eval_pipeline(sample, self.crop)
        item = {"image": torch.from_numpy(sample["image"])}
        if "seg" in sample:
            item["seg"] = torch.from_numpy(np.ascontiguousarray(sample["seg"], dtype=np.int64))
        if "depth" in sample:
            item["depth"] = torch.from_numpy(np.ascontiguousarray(sample["depth"], dtype=np.float32))
        if self.task == "det":
            item["boxes"] = torch.from_numpy(np.ascontiguousarray(sample["boxes"], dtype=np.float32)).reshape(-1, 4)
            item["labels"] = torch.from_numpy(np.ascontiguousarray(sample["labels"], dtype=np.int64))
            if "masks" in sample:
                item["masks"] = torch.from_numpy(np.ascontiguousarray(sample["masks"], dtype=np.uint8))
        item["index"] = int(index)  # all conversions above are numpy: no torch thread pools per item
        return item
