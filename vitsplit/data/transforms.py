"""The mmseg ADE20K pipelines on numpy samples (train: rescale, cat-max-ratio crop, flip,
photometric distortion, normalise, pad; test (``eval_pipeline``): keep-ratio resize, normalise).

Reference: MMSegmentation's ``configs/_base_/datasets/ade20k.py`` (``RandomResize(scale=(2048, 512),
ratio_range=(0.5, 2.0), keep_ratio=True)``, ``RandomCrop(crop_size, cat_max_ratio=0.75)``,
``RandomFlip(prob=0.5)``, ``PhotoMetricDistortion``, then ``SegDataPreProcessor``: normalise, pad
with 0 / seg 255), with crop 512 generalised to ``crop`` and scale ``(4 * crop, crop)``.

A sample is a dict of numpy arrays: ``image`` (H, W, 3) uint8 RGB; optional ``seg`` (H, W) uint8
(255 = ignore), ``depth`` (H, W) float32 (0 = invalid), ``boxes`` (N, 4) float32 xyxy pixels,
``labels`` (N,) int64, ``masks`` (N, H, W) uint8. Geometric transforms move every field: the image
is resized bilinearly (like cv2 INTER_LINEAR, no antialias; all numpy, so no torch thread pools
in the data path), seg/depth/masks by nearest neighbour,
boxes are scaled, shifted, clipped and flipped; a box that becomes empty (or whose mask becomes
empty) is dropped with its label and mask.

Randomness: every random draw comes from the ``numpy.random.Generator`` passed in, in a fixed
order, so an augmented sample is a pure function of that generator's seed. The datasets seed it
per (seed, split, epoch, index) (see ``vitsplit.data.dataset``).
"""

from __future__ import annotations

import numpy as np

from ..ops.imagenet import IMAGENET_MEAN, IMAGENET_STD
from .labels import IGNORE_INDEX

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


# ---------------------------------------------------------------- geometry
def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio size (mmcv ``rescale_size``): the largest size with long side <= max(scale) and
    short side <= min(scale); returns (new_h, new_w)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for nearest resizing: floor(i * n_in / n_out)."""
    return np.minimum((np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _linear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel-centre linear interpolation taps (cv2 INTER_LINEAR / align_corners=False)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(image: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (nh, nw, 3) uint8, separable bilinear, rounded (numpy: no torch threads)."""
    h, w = image.shape[:2]
    r0, r1, fr = _linear_taps(nh, h)
    c0, c1, fc = _linear_taps(nw, w)
    x = image.astype(np.float32)
    x = x[r0] * (1.0 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    x = x[:, c0] * (1.0 - fc)[None, :, None] + x[:, c1] * fc[None, :, None]
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def resize(sample: dict, size: tuple[int, int]) -> dict:
    """Resize every field of ``sample`` to ``size`` = (new_h, new_w)."""
    h, w = sample["image"].shape[:2]
    nh, nw = size
    if (nh, nw) == (h, w):
        return sample
    out = dict(sample)
    out["image"] = resize_bilinear(sample["image"], nh, nw)
    rows, cols = _nearest_index(nh, h), _nearest_index(nw, w)
    for key in ("seg", "depth"):
        if key in sample:
            out[key] = sample[key][rows[:, None], cols[None, :]]
    if "masks" in sample:
        out["masks"] = sample["masks"][:, rows[:, None], cols[None, :]]
    if "boxes" in sample:
        out["boxes"] = sample["boxes"] * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
        out = _keep_valid(out, nh, nw)
    return out


def crop_bbox(rng: np.random.Generator, h: int, w: int, crop: int) -> tuple[int, int, int, int]:
    """A random ``crop`` x ``crop`` window (smaller where the image is): (y0, y1, x0, x1)."""
    y0 = int(rng.integers(0, max(h - crop, 0) + 1))
    x0 = int(rng.integers(0, max(w - crop, 0) + 1))
    return y0, y0 + min(crop, h), x0, x0 + min(crop, w)


def choose_crop(
    rng: np.random.Generator,
    seg: np.ndarray | None,
    h: int,
    w: int,
    crop: int,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop._get_crop_bbox``: retry up to 10 times until the window holds more than one
    class and no class covers ``cat_max_ratio`` or more of its non-ignored pixels; after 10 failures
    the 11th window drawn is used."""
    box = crop_bbox(rng, h, w, crop)
    if seg is None or cat_max_ratio >= 1.0:
        return box
    for _ in range(10):
        y0, y1, x0, x1 = box
        counts = np.bincount(seg[y0:y1, x0:x1].ravel(), minlength=256)
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = crop_bbox(rng, h, w, crop)
    return box


def crop(sample: dict, box: tuple[int, int, int, int]) -> dict:
    """Cut window ``box`` = (y0, y1, x0, x1) out of every field."""
    y0, y1, x0, x1 = box
    out = dict(sample)
    out["image"] = sample["image"][y0:y1, x0:x1]
    for key in ("seg", "depth"):
        if key in sample:
            out[key] = sample[key][y0:y1, x0:x1]
    if "masks" in sample:
        out["masks"] = sample["masks"][:, y0:y1, x0:x1]
    if "boxes" in sample:
        out["boxes"] = sample["boxes"] - np.array([x0, y0, x0, y0], np.float32)
        out = _keep_valid(out, y1 - y0, x1 - x0)
    return out


def hflip(sample: dict) -> dict:
    """Mirror every field left-right."""
    w = sample["image"].shape[1]
    out = dict(sample)
    out["image"] = sample["image"][:, ::-1]
    for key in ("seg", "depth"):
        if key in sample:
            out[key] = sample[key][:, ::-1]
    if "masks" in sample:
        out["masks"] = sample["masks"][:, :, ::-1]
    if "boxes" in sample:
        b = sample["boxes"]
        out["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1).astype(np.float32)
    return out


def _keep_valid(sample: dict, h: int, w: int) -> dict:
    """Clip boxes to the (h, w) image and drop boxes (labels, masks) that became empty."""
    b = sample["boxes"].copy()
    b[:, 0::2] = b[:, 0::2].clip(0, w)
    b[:, 1::2] = b[:, 1::2].clip(0, h)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    if "masks" in sample and len(b):
        keep &= sample["masks"].reshape(len(b), -1).any(1)
    out = dict(sample)
    out["boxes"] = b[keep]
    out["labels"] = sample["labels"][keep]
    if "masks" in sample:
        out["masks"] = sample["masks"][keep]
    return out


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) float32 xyxy boxes of their pixels (x2 = last column + 1)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


# ---------------------------------------------------------------- photometric (mmseg PhotoMetricDistortion)
def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv8(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> uint8 HSV in OpenCV's 8-bit convention (H in 0..179 = degrees / 2)."""
    x = img.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = 255.0 * diff / np.maximum(v, 1.0)  # diff = 0 where v = 0
    safe = np.maximum(diff, 1e-6)
    hue = np.where(
        v == r, 60.0 * (g - b) / safe, np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe)
    )
    hue = np.where(diff > 0, np.mod(hue, 360.0), 0.0)
    out = np.empty(img.shape, np.uint8)
    out[..., 0] = np.round(hue * 0.5) % 180
    out[..., 1] = np.round(s)
    out[..., 2] = v
    return out


def hsv8_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv8`: (H, W, 3) uint8 HSV (OpenCV 8-bit) -> uint8 RGB.

    Per channel ``c = v - v * s * clip(min(k, 4 - k), 0, 1)`` with ``k = (n + hue / 60) mod 6`` and
    n = 5, 3, 1 for R, G, B (the standard closed form of the HSV hexcone)."""
    h6 = hsv[..., 0].astype(np.float32) * np.float32(2.0 / 60.0)
    vs = hsv[..., 2].astype(np.float32) * (hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0))
    v = hsv[..., 2].astype(np.float32)
    out = np.empty(hsv.shape, np.uint8)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = np.mod(n + h6, 6.0)
        c = v - vs * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        out[..., channel] = np.clip(np.round(c), 0, 255)
    return out


def photometric_distortion(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast: tuple[float, float] = (0.5, 1.5),
    saturation: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on (H, W, 3) uint8: brightness, contrast (first or last, at
    random), saturation, hue; each applied with probability 0.5, in this draw order."""
    if rng.integers(2):
        img = _convert(img, beta=float(rng.uniform(-brightness_delta, brightness_delta)))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=float(rng.uniform(*contrast)))
    if rng.integers(2):
        hsv = rgb_to_hsv8(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=float(rng.uniform(*saturation)))
        img = hsv8_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv8(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta + 1))) % 180
        img = hsv8_to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=float(rng.uniform(*contrast)))
    return img


# ---------------------------------------------------------------- pipelines
def normalize(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ImageNet mean/std (:mod:`vitsplit.ops.imagenet`)."""
    x = (img.astype(np.float32) * np.float32(1.0 / 255.0) - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pad_to(sample: dict, size: tuple[int, int]) -> dict:
    """Pad bottom/right up to ``size`` = (H, W): normalised image 0, seg 255, depth 0, masks 0.
    ``sample["image"]`` must already be the (3, H, W) array from :func:`normalize`."""
    h, w = sample["image"].shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return sample
    out = dict(sample)
    out["image"] = np.pad(sample["image"], ((0, 0), (0, ph), (0, pw)), constant_values=0.0)
    if "seg" in sample:
        out["seg"] = np.pad(sample["seg"], ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    if "depth" in sample:
        out["depth"] = np.pad(sample["depth"], ((0, ph), (0, pw)), constant_values=0.0)
    if "masks" in sample:
        out["masks"] = np.pad(sample["masks"], ((0, 0), (0, ph), (0, pw)), constant_values=0)
    return out


def train_pipeline(
    sample: dict,
    crop_size: int,
    rng: np.random.Generator,
    *,
    cat_max_ratio: float = 0.75,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    recompute_boxes: bool = False,
) -> dict:
    """mmseg ADE20K train pipeline; returns the sample with ``image`` a normalised (3, crop, crop) float32 array.

    ``recompute_boxes``: re-derive boxes from the transformed masks (for datasets whose boxes are the
    visible-mask boxes, e.g. synthetic), instead of clipping the transformed boxes.
    """
    h, w = sample["image"].shape[:2]
    ratio = float(rng.random()) * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    scale = (int(4 * crop_size * ratio), int(crop_size * ratio))
    sample = resize(sample, rescale_size(h, w, scale))
    h, w = sample["image"].shape[:2]
    sample = crop(sample, choose_crop(rng, sample.get("seg"), h, w, crop_size, cat_max_ratio))
    if rng.random() < 0.5:
        sample = hflip(sample)
    sample = dict(sample, image=photometric_distortion(sample["image"], rng))
    if recompute_boxes and "masks" in sample:
        sample["boxes"] = boxes_from_masks(sample["masks"])
    sample["image"] = normalize(sample["image"])
    return pad_to(sample, (crop_size, crop_size))


def eval_pipeline(sample: dict, crop_size: int) -> dict:
    """mmseg ADE20K test pipeline: keep-ratio resize to scale (4 * crop, crop), normalise (no pad).
    Labels are resized with the image (nearest), so predictions and labels share one grid."""
    h, w = sample["image"].shape[:2]
    sample = resize(sample, rescale_size(h, w, (4 * crop_size, crop_size)))
    return dict(sample, image=normalize(sample["image"]))
