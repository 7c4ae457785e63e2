"""Reading images and label maps from disk, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of the image file ``path``."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); replace or remove the file") from None


def read_label(path: Path) -> np.ndarray:
    """(H, W) integer label map of the single-channel (L, P, I or I;16) PNG ``path``."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise UserError(f"label map {path} has mode {im.mode}; it must be a single-channel "
                                "(grey or palette) PNG of class indices")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise UserError(f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read label map {path} ({exc}); replace or remove the file") from None


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise UserError(f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but its "
                        f"label map {label_path} is {label.shape[1]}x{label.shape[0]}; fix or remove the pair")
