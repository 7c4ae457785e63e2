"""Texture bank for the synthetic scenes: grey-level photographs shipped in scikit-image's wheel.

The photographs (``skimage.data``: brick, grass, gravel for objects; camera, moon, coins, page,
coffee, chelsea, astronaut, rocket, hubble_deep_field, immunohistochemistry for backgrounds) are
loaded once per process on first use, converted to grey, cropped to the central square, resized to
``BANK_SIZE`` px and normalised to [0, 1] (per-image min/max). Colour never comes from here: the
scene generator maps grey levels to random colour pairs, so colour does not identify a class.
Two procedural banks (white noise and blurred "blotch" noise) are made with a fixed seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

BANK_SIZE = 256
OBJECT_PHOTOS = ("brick", "grass", "gravel")
BACKGROUND_PHOTOS = (
    "camera",
    "moon",
    "coins",
    "page",
    "coffee",
    "chelsea",
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
)


def _to_bank(image: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (BANK_SIZE, BANK_SIZE) float32 in [0, 1]."""
    if image.ndim == 3:
        image = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    image = image.astype(np.float32)
    h, w = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(image[top : top + s, left : left + s], mode="F")
    out = np.asarray(square.resize((BANK_SIZE, BANK_SIZE), Image.BILINEAR), dtype=np.float32)
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """The named scikit-image photograph as a (BANK_SIZE, BANK_SIZE) float32 grey texture in [0, 1]."""
    import skimage.data  # noqa: PLC0415 - scikit-image takes seconds to import; only textures need it

    return _to_bank(np.asarray(getattr(skimage.data, name)()))


@lru_cache(maxsize=None)
def noise(kind: str) -> np.ndarray:
    """Procedural (BANK_SIZE, BANK_SIZE) float32 textures in [0, 1]: ``white`` or ``blotch``.

    ``blotch`` is white noise low-passed in the Fourier domain (periodic, so it tiles seamlessly).
    """
    rng = np.random.default_rng(12345 if kind == "white" else 54321)
    base = rng.random((BANK_SIZE, BANK_SIZE)).astype(np.float32)
    if kind == "blotch":
        f = np.fft.fftfreq(BANK_SIZE)
        radius2 = f[:, None] ** 2 + f[None, :] ** 2
        base = np.fft.ifft2(np.fft.fft2(base) * np.exp(-radius2 / (2 * 0.03**2))).real.astype(np.float32)
    lo, hi = float(base.min()), float(base.max())
    return (base - lo) / (hi - lo)
