"""Inference over a dataset: mmseg's sliding window, and batches of equally sized images.

:func:`slide_inference` is mmseg's ``EncoderDecoder.slide_inference``: windows of ``crop`` at
``stride``, the last window in each direction moved back to end at the border, logits summed and
divided by the per-pixel window count.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's window grid: [(y1, y2, x1, x2)] covering (height, width) with ``crop`` windows."""
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def slide_inference(model: Any, images: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """images (B, 3, H, W) -> averaged logits (B, K, H, W); ``model(x)`` gives (B, K, h, w) at x's size."""
    b, _, h, w = images.shape
    logits = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        logits[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2]).float()
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def same_size_batches(dataset: Any, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive items grouped while their image sizes match (val images may differ in size)."""
    group: list[dict[str, Any]] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if group and (len(group) == batch_size or group[0]["image"].shape != item["image"].shape):
            yield group
            group = []
        group.append(item)
    if group:
        yield group
