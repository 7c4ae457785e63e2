"""UperNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018) as
MMSegmentation 0.20 builds it (``UPerHead``), with its auxiliary ``FCNHead`` (Long et al., CVPR 2015):
the decode and auxiliary heads of the ViT-Adapter and DINOv2 + UperNet ADE20K configs
(``configs/_base_/models/upernet_r50.py``: channels 512, pool scales (1, 2, 3, 6), dropout 0.1;
auxiliary head on level 2 with 256 channels, one 3x3 conv, no input concatenation, dropout 0.1,
loss weight 0.4).

UPerHead on four maps x_0..x_3 (strides 4..32):
- PPM on x_3: for each pool scale s, AdaptiveAvgPool(s) -> 1x1 ConvBNReLU -> bilinear back to x_3's
  size; concatenated with x_3 and fused by a 3x3 ConvBNReLU (``bottleneck``) into lateral 3.
- Laterals 0-2: 1x1 ConvBNReLU. Top-down: lateral i-1 += bilinear(lateral i).
- FPN outputs: 3x3 ConvBNReLU on laterals 0-2 (lateral 3 as is), all resized to x_0's size,
  concatenated, a 3x3 ConvBNReLU (``fpn_bottleneck``), Dropout2d(0.1), 1x1 classifier.
ConvBNReLU is mmcv's ``ConvModule``: conv without bias, BatchNorm (SyncBN in the release; the
trainer converts under multi-GPU DDP), ReLU. Resizes are bilinear with align_corners=False.

Init as mmseg: ConvModule convs Kaiming-normal (fan_out, ReLU gain), BatchNorm 1/0, classifiers
normal(0, 0.01) with zero bias.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import SegHead

AUX_LOSS_WEIGHT = 0.4  # the auxiliary FCN head's loss weight in the published configs


class ConvBNReLU(nn.Sequential):
    """Conv2d(cin, cout, k, padding k//2, no bias) -> BatchNorm2d -> ReLU; (B, cin, h, w) -> (B, cout, h, w)."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _Classifier(nn.Sequential):
    """Dropout2d(p) -> Conv2d 1x1 (channels -> num_classes), weight normal(0, 0.01), bias 0."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        conv = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(conv.weight, 0.0, 0.01)
        nn.init.zeros_(conv.bias)
        super().__init__(nn.Dropout2d(dropout), conv)


class UPerHead(nn.Module):
    """Four maps [(B, C_i, h_i, w_i)] (finest first) -> logits (B, num_classes, h_0, w_0)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.psp = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1)) for s in self.pool_scales]
        )
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.cls = _Classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.lateral_convs) + 1:
            raise ValueError(f"UPerHead takes {len(self.lateral_convs) + 1} maps, got {len(feats)}")
        top = feats[-1]
        pooled = [_resize(branch(top), top.shape[-2:]) for branch in self.psp]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.cls(fused)


class FCNHead(nn.Module):
    """mmseg's FCNHead with ``num_convs`` 3x3 ConvBNReLU and no input concatenation:
    (B, C_in, h, w) -> (B, num_classes, h, w)."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1
    ):
        super().__init__()
        self.convs = nn.Sequential(
            *[ConvBNReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        )
        self.cls = _Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.convs(x))


class UperNetSegHead(nn.Module):
    """UPerHead (decode) + FCNHead on level ``aux_index`` (auxiliary, training only).

    ``forward(feats, size)`` -> decode logits (B, K, H, W) bilinearly resized to ``size``.
    ``loss(feats, label)`` -> {"loss": ce_decode + 0.4 * ce_aux, "loss_ce", "loss_aux"}, each CE
    averaged as mmseg 0.20 does (:meth:`vitsplit.heads.SegHead.loss`), logits resized to the label.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 512,
        aux_channels: int = 256,
        aux_index: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.aux_index = int(aux_index)
        self.decode = UPerHead(in_channels, num_classes, channels=channels, dropout=dropout)
        self.aux = FCNHead(int(in_channels[self.aux_index]), num_classes, channels=aux_channels, dropout=dropout)

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return _resize(self.decode(feats), size)

    ce_loss = SegHead.loss  # the one segmentation cross-entropy of the toolkit

    def loss(self, feats: Sequence[torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
        """feats: the four maps; label: (B, H, W) class indices, 255 ignored."""
        ce = self.ce_loss(self.decode(feats), label)
        aux = self.ce_loss(self.aux(feats[self.aux_index]), label)
        return {"loss": ce + AUX_LOSS_WEIGHT * aux, "loss_ce": ce.detach(), "loss_aux": aux.detach()}
