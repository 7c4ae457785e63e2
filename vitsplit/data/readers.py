"""Reading images and label maps from disk, with errors that name the file.

Pixel depth: 8-bit modes (``1``, ``L``, ``P``, ``LA``, ``RGB``, ``RGBA``, ``CMYK``, ...) convert to RGB as
PIL does; 16-bit grey (``I;16*``, e.g. a 16-bit PNG) is scaled by 255 / 65535 = 1 / 257 (0 -> 0, 65535 -> 255)
instead of PIL's clipping at 255, which would turn a 16-bit image almost entirely white. ``I`` (32-bit
integer) and ``F`` (32-bit float) pixels have no fixed range, so they are refused rather than guessed.

Decompression bombs: a file whose header claims more than Pillow's ``Image.MAX_IMAGE_PIXELS`` (89.5 M
pixels by default, about 268 MB as RGB) is refused before it is decoded, naming the file and its size.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit float"}
LABEL_MODES = ("L", "P", "I", "1") + SIXTEEN_BIT_MODES


@contextlib.contextmanager
def _open(path: Path, kind: str) -> Iterator[Image.Image]:
    """``Image.open(path)`` whose failures are one-line UserErrors naming ``path`` (``kind``: "image" or
    "label map"); a header larger than ``Image.MAX_IMAGE_PIXELS`` is refused before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{kind} file not found: {path}") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,}" if found else "more"
        raise UserError(
            f"refused {kind} {path}: its header claims {size} pixels, more than the "
            f"{Image.MAX_IMAGE_PIXELS:,} that Pillow decodes safely (a corrupt or malicious file?); "
            "replace or remove the file"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {kind} {path} ({exc}); replace or remove the file") from None
    try:
        with im:
            yield im
    except (OSError, ValueError) as exc:  # truncated or corrupt pixel data, found while decoding
        raise UserError(f"cannot read {kind} {path} ({exc}); replace or remove the file") from None


def to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of ``im`` (opened from ``path``), 16-bit grey scaled by 1/257."""
    if im.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(im).astype(np.uint32)
        grey = ((grey * 255 + 65535 // 2) // 65535).astype(np.uint8)  # round(v / 257)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode in UNSCALED_MODES:
        raise UserError(
            f"image {path} has {UNSCALED_MODES[im.mode]} pixels (PIL mode {im.mode}), whose value "
            "range is not defined; save it as an 8-bit or 16-bit image"
        )
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of the image file ``path``."""
    with _open(path, "image") as im:
        return to_rgb(im, path)


def read_label(path: Path) -> np.ndarray:
    """(H, W) integer label map of the single-channel (L, P, I or I;16) PNG ``path``."""
    with _open(path, "label map") as im:
        if im.mode not in LABEL_MODES:
            raise UserError(
                f"label map {path} has mode {im.mode}; it must be a single-channel "
                "(grey or palette) PNG of class indices"
            )
        return np.asarray(im).astype(np.int64)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise UserError(
            f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but its "
            f"label map {label_path} is {label.shape[1]}x{label.shape[0]}; fix or remove the pair"
        )
