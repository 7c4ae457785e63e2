"""Procedural scenes: the embedded default dataset (spec ``synthetic``).

Each scene is a textured background with several objects painted in back-to-front (painter's)
order. An object class is a pair (shape, texture statistics); the colours of every object and of
the background are drawn at random per scene, so colour alone never gives the class:

====  =========  ============================================  ===========
id    shape      texture (grey level t, mapped to 2 colours)   source
====  =========  ============================================  ===========
1     disc       stripes, period 4-7 px                        procedural
2     square     checkerboard, period 5-9 px                   procedural
3     triangle   dot grid                                      procedural
4     ring       brick                                         skimage.data.brick
5     cross      grass                                         skimage.data.grass
6     star       gravel                                        skimage.data.gravel
7     ellipse    white noise                                   procedural
8     hexagon    concentric circles around the object centre   procedural
9     crescent   blotchy low-frequency noise                   procedural
10    ell        wavy lines                                    procedural
====  =========  ============================================  ===========

Geometry: objects get a depth in [2.5, 9] (sorted far to near = painting order); their radius and
texture period scale with ``(5 / depth) ** 0.6`` (radius 0.09-0.17 of the short side at depth 5) (a perspective cue),
position is uniform, rotation
uniform. Later objects occlude earlier ones. Periods are given for 112 px scenes and scale with the
scene size, so a 224 px scene looks like a 112 px one at twice the resolution. ``zoom`` multiplies
every object's radius and texture period (the background is unchanged): at zoom 1 an object at
depth 5 of a 112 px scene is 1.5-3 patches of 14 px across and its texture repeats every 4-9 px; at
zoom 2 it is 3-5 patches across and a patch holds one or two texture periods.

Labels (the convention of every dataset here, :mod:`vitsplit.data`):
- ``seg``: 0 = background, 1..K = object classes (segmentation has K + 1 classes);
- det ``labels`` 1..K (K object classes, 0 is background as in torchvision), ``masks`` the
  *visible* part of each instance, ``boxes`` xyxy from the visible mask (x2 = last column + 1);
  instances whose visible area is below ``min_area`` are dropped from the det targets (their pixels
  keep their class in ``seg``);
- ``depth``: metres-like values, background 10-14.5 (a ground-plane gradient, farther towards the
  top), each object constant depth plus a slight tilt; all > 0 (no invalid pixels).

Determinism: scene ``index`` of split ``split`` is a pure function of ``(seed, split, index)``
through ``numpy.random.SeedSequence(seed, spawn_key=(0xC0DE, split_id, index))``; train
(split_id 0) and val (split_id 1) are independent streams, hence disjoint scenes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from . import textures

SHAPES = ("disc", "square", "triangle", "ring", "cross", "star", "ellipse", "hexagon", "crescent", "ell")
TEXTURES = ("stripes", "checker", "dots", "brick", "grass", "gravel", "white", "circles", "blotch", "waves")
MAX_CLASSES = len(SHAPES)
MAX_ZOOM = 4  # at zoom 4 the largest object (radius 0.68 x 1.52 of the short side) already overfills the scene
_SPLIT_IDS = {"train": 0, "val": 1}
_SQRT3 = float(np.sqrt(3.0))


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test of ``shape`` at object-frame coordinates ``x, y`` (circumradius 1); bool array."""
    if shape == "disc":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.75
    if shape == "triangle":
        return (y >= -0.5) & (y <= 1.0 - _SQRT3 * np.abs(x))
    if shape == "ring":
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if shape == "star":
        theta = np.arctan2(y, x)
        return np.sqrt(x * x + y * y) <= 0.55 + 0.45 * np.cos(5.0 * theta)
    if shape == "ellipse":
        return x * x + 4.0 * y * y <= 1.0
    if shape == "hexagon":
        ax, ay = np.abs(x), np.abs(y)
        return np.maximum(ay, 0.5 * (_SQRT3 * ax + ay)) <= 0.87
    if shape == "crescent":
        return (x * x + y * y <= 1.0) & ((x - 0.45) ** 2 + y * y > 0.5)
    if shape == "ell":
        return (np.maximum(np.abs(x), np.abs(y)) <= 0.8) & ~((x > -0.15) & (y > -0.15))
    raise ValueError(shape)


def texture_values(kind: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Grey level in [0, 1] of texture ``kind`` at object-frame pixel coordinates ``u, v`` (same shape)."""
    if kind == "stripes":
        return (np.sin(u * (2 * np.pi / period)) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        p = 1.3 * period
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        return (du * du + dv * dv <= (0.3 * p) ** 2).astype(np.float32)
    if kind == "circles":
        return (np.sin(np.sqrt(u * u + v * v) * (2 * np.pi / period)) > 0).astype(np.float32)
    if kind == "waves":
        return (np.sin((u + 2.0 * np.sin(v * (2 * np.pi / (3 * period)))) * (2 * np.pi / period)) > 0).astype(
            np.float32
        )
    bank = textures.noise(kind) if kind in ("white", "blotch") else textures.photo(kind)
    step = 5.0 / period  # bank pixels per scene pixel (period 5 -> native resolution)
    n = bank.shape[0]
    off = rng.integers(0, n, 2)
    iu = np.floor(u * step).astype(np.int64) + off[0]
    iv = np.floor(v * step).astype(np.int64) + off[1]
    return bank[iv % n, iu % n]


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a bright random RGB colour (channel gap >= 0.1, ~0.5 on average), in random order."""
    dark = rng.uniform(0.0, 0.45, 3).astype(np.float32)
    bright = rng.uniform(0.55, 1.0, 3).astype(np.float32)
    return (dark, bright) if rng.random() < 0.5 else (bright, dark)


@dataclass
class SyntheticScenes:
    """Scene generator: ``load(index) -> raw sample`` (uint8 image, seg, depth, boxes, labels, masks).

    size: (H, W) in pixels; num_classes: K object classes (1..10); max_objects: objects per scene
    are drawn from [min(3, max_objects), max_objects]; length: ``len()``; min_area: smallest visible
    instance area (pixels) kept in the det targets (default max(12, H*W/1000)); zoom: multiplier of
    object radius and texture period (1..4).
    """

    size: tuple[int, int] = (112, 112)
    num_classes: int = 8
    max_objects: int = 6
    length: int = 10_000
    seed: int = 0
    split: str = "train"
    min_area: int | None = None
    zoom: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"synthetic classes must be in 1..{MAX_CLASSES}, got {self.num_classes}")
        if self.max_objects < 1:
            raise UserError(f"synthetic objects must be >= 1, got {self.max_objects}")
        if min(self.size) < 16:
            raise UserError(f"synthetic size must be >= 16 px, got {self.size}")
        if self.length < 1:
            raise UserError(f"dataset length must be >= 1, got {self.length}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.split not in _SPLIT_IDS:
            raise UserError(f"split must be 'train' or 'val', got {self.split!r}")
        if not 1 <= self.zoom <= MAX_ZOOM:
            raise UserError(f"synthetic zoom must be in 1..{MAX_ZOOM}, got {self.zoom}")
        if self.min_area is None:
            self.min_area = max(12, self.size[0] * self.size[1] // 1000)

    @property
    def class_names(self) -> list[str]:
        """Object class names (without background), index k-1 for label k."""
        return [f"{SHAPES[k]}/{TEXTURES[k]}" for k in range(self.num_classes)]

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        ss = np.random.SeedSequence(self.seed, spawn_key=(0xC0DE, _SPLIT_IDS[self.split], int(index)))
        return np.random.default_rng(ss)

    def load(self, index: int) -> dict:
        """Scene ``index``: dict of numpy arrays (see the module docstring for the conventions).

        image (H, W, 3) uint8; seg (H, W) uint8; depth (H, W) float32; inst (H, W) int16 painter
        layer (-1 background); painted (n,) pixels each layer covered before occlusion; classes (n,)
        label of each layer; boxes (N, 4) float32; labels (N,) int64; masks (N, H, W) uint8.
        """
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self.rng(index)
        h, w = self.size
        unit = min(h, w) / 112.0  # scene pixels per 112-px reference pixel
        image, depth = self._background(rng, h, w, unit)
        seg = np.zeros((h, w), np.uint8)
        inst = np.full((h, w), -1, np.int16)

        lo = min(3, self.max_objects)
        n = int(rng.integers(lo, self.max_objects + 1))
        classes = rng.integers(0, self.num_classes, n)
        if self.num_classes > 1 and n > 1 and classes[0] == classes[1]:  # at least two classes per scene
            classes[1] = (classes[0] + 1 + rng.integers(0, self.num_classes - 1)) % self.num_classes
        rng.shuffle(classes)
        depths = np.sort(rng.uniform(2.5, 9.0, n))[::-1]  # far to near = painting order
        painted = np.zeros(n, np.int64)
        for layer, (k, d) in enumerate(zip(classes.tolist(), depths.tolist())):
            painted[layer] = self._paint(rng, image, seg, inst, depth, layer, k, d, unit)

        image += rng.normal(0.0, 0.02, image.shape).astype(np.float32)
        image8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        masks, labels, boxes = [], [], []
        visible = np.bincount(inst.ravel().astype(np.int64) + 1, minlength=n + 1)[1:]
        for layer, k in enumerate(classes.tolist()):
            if visible[layer] < self.min_area:
                continue
            m = inst == layer
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            labels.append(k + 1)
            masks.append(m)
        return {
            "image": image8,
            "seg": seg,
            "depth": depth,
            "inst": inst,
            "painted": painted,
            "classes": classes.astype(np.int64) + 1,
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "masks": (np.stack(masks) if masks else np.zeros((0, h, w), bool)).astype(np.uint8),
        }

    def _background(self, rng: np.random.Generator, h: int, w: int, unit: float) -> tuple[np.ndarray, np.ndarray]:
        """Random photo crop (grey, two random colours) over a random low-frequency colour wash."""
        name = textures.BACKGROUND_PHOTOS[int(rng.integers(len(textures.BACKGROUND_PHOTOS)))]
        bank = textures.photo(name)
        n = bank.shape[0]
        step = float(rng.uniform(0.7, 1.6)) / unit
        span_y, span_x = int(h * step) + 1, int(w * step) + 1  # offsets that avoid wrapping seams
        ys = ((np.arange(h) * step).astype(np.int64) + rng.integers(0, max(n - span_y, 1))) % n
        xs = ((np.arange(w) * step).astype(np.int64) + rng.integers(0, max(n - span_x, 1))) % n
        t = bank[ys[:, None], xs[None, :]]
        if rng.random() < 0.5:
            t = 1.0 - t
        a, b = _colour_pair(rng)
        contrast = float(rng.uniform(0.4, 1.0))
        image = (a + (b - a) * (0.5 + contrast * (t[..., None] - 0.5))).astype(np.float32)
        blot = textures.noise("blotch")
        oy, ox = rng.integers(0, n, 2)
        wash = blot[(np.arange(h) + oy) % n][:, (np.arange(w) + ox) % n]
        image += rng.uniform(-0.25, 0.25, 3).astype(np.float32) * (wash[..., None] - 0.5)
        yy = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
        xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
        depth = 10.25 + 4.0 * yy + float(rng.uniform(-0.5, 0.5)) * xx  # in [10, 14.5]
        return image, depth.astype(np.float32)

    def _paint(self, rng, image, seg, inst, depth, layer: int, k: int, d: float, unit: float) -> int:
        """Paint object of class index ``k`` (0-based) at depth ``d`` over the scene, in place;
        returns the number of pixels painted."""
        h, w = seg.shape
        persp = (5.0 / d) ** 0.6
        radius = float(rng.uniform(0.09, 0.17)) * self.zoom * min(h, w) * persp
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.uniform(0, 2 * np.pi)
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, w)
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, h)
        if x1 <= x0 or y1 <= y0:
            return 0
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u = c * dx + s * dy  # object frame, pixels
        v = c * dy - s * dx
        inside = shape_mask(SHAPES[k], u / radius, v / radius)
        if not inside.any():
            return 0
        base_period = {"stripes": 5.5, "checker": 7.0, "dots": 5.0, "circles": 5.0, "waves": 5.0}.get(TEXTURES[k], 5.0)
        period = base_period * self.zoom * unit * persp * float(rng.uniform(0.8, 1.25))
        t = texture_values(TEXTURES[k], u, v, period, rng)
        a, b = _colour_pair(rng)
        patch = a + (b - a) * t[..., None]
        region = (slice(y0, y1), slice(x0, x1))
        image[region][inside] = patch[inside]
        seg[region][inside] = k + 1
        inst[region][inside] = layer
        tilt = float(rng.uniform(-0.3, 0.3))
        depth[region][inside] = (d + tilt * u / max(radius, 1.0))[inside]
        return int(inside.sum())
