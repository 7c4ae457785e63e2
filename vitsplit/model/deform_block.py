"""The deformable block of ViT-Split's prior head and fusion net (Li et al., ICCV 2025).

As in the ViT-Split release: a plain ``Conv2d(C, 18, 3, padding=1)`` with bias predicts per-pixel
offsets, then a 3x3 deformable convolution C -> C with padding 1, no bias, no modulation mask
(DCNv1, :class:`vitsplit.ops.deform_conv.DeformConv3x3`) and one offset group.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.deform_conv import DeformConv3x3


class DeformBlock(nn.Module):
    """Offsets from a plain 3x3 conv (with bias), then a 3x3 DCNv1 conv without bias; no norm.

    (B, Cin, h, w) -> (B, Cout, h, w). The offset conv starts at zero (our choice, as mmcv's
    ``DeformConv2dPack`` and DCN implementations generally do), so at initialisation the block is
    an ordinary 3x3 conv and offsets grow from there.
    """

    def __init__(self, in_channels: int, out_channels: int, *, impl: str = "fast"):
        super().__init__()
        self.offset = nn.Conv2d(in_channels, 18, 3, padding=1, bias=True)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv3x3(in_channels, out_channels, impl=impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.offset(x))
