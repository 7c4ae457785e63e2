"""A parameter-free four-level pyramid from a plain ViT, for UperNet on a fine-tuned backbone
(the "DINOv2 + UperNet" rows of the ViT-Split paper's tables).

Four intermediate blocks' patch-token maps (after the backbone's final norm), all on the patch
grid (B, C, h, w), are brought to 4x, 2x, 1x and 0.5x that grid (strides p/4, p/2, p, 2p for patch
size p: 4, 8, 16, 32 at p = 16) as BEiT's segmentation neck arranges them (Bao et al., ICLR 2022),
but resized without parameters: bilinear 4x and 2x up-sampling, identity, 2x2 max-pooling. The published DINOv2-B/L +
UperNet
totals (120.7 M / 341.2 M with 150 classes) are exactly the backbone plus UperNet and its auxiliary
head, which leaves no room for a neck with weights (BEiT's transposed convs would add 7.1 M at B).

The blocks read are the last of each of ViT-Adapter's four interaction groups
(:func:`~vitsplit.model.vit_adapter.interaction_groups`: 2, 5, 8, 11 for 12 blocks; 5, 11, 17, 23
for 24), the depths at which ViT-Adapter's interactions hand its ViT features over.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vit_adapter import interaction_groups


def pyramid_layers(num_layers: int) -> list[int]:
    """The last block of each of ViT-Adapter's four interaction groups."""
    return [last for _, last in interaction_groups(num_layers)]


class PlainPyramid(nn.Module):
    """Four (B, C, h, w) maps -> [(B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w), (B, C, h//2, w//2)]; no parameters."""

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != 4:
            raise ValueError(f"PlainPyramid takes 4 maps, got {len(maps)}")
        m0, m1, m2, m3 = maps
        return [
            F.interpolate(m0, scale_factor=4, mode="bilinear", align_corners=False),
            F.interpolate(m1, scale_factor=2, mode="bilinear", align_corners=False),
            m2,
            F.max_pool2d(m3, kernel_size=2, stride=2),
        ]
