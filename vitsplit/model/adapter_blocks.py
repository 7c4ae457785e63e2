"""The building blocks of ViT-Adapter (Chen et al., "Vision Transformer Adapter for Dense
Predictions", ICLR 2023): the spatial prior module, the injector, the extractor with its ConvFFN,
and the interaction block that runs one group of ViT blocks between an injector and an extractor.

Notation (the paper's Fig. 3 and eqs. 1-4): F_vit^i (B, N, C) are the ViT's patch tokens before
group i, F_sp^i (B, S, C) the spatial features, the 1/8, 1/16 and 1/32 maps of the spatial prior
module flattened and concatenated (S = s_8 + s_16 + s_32 positions).

- Injector (eq. 1): F_vit^i <- F_vit^i + gamma^i * Attention(norm(F_vit^i), norm(F_sp^i)), with
  gamma^i initialised to 0, so the pretrained ViT's features are untouched at the start.
- Extractor (eqs. 2-3): F_sp <- F_sp + Attention(norm(F_sp), norm(F_vit^{i+1})), then
  F_sp <- F_sp + ConvFFN(norm(F_sp)).
- Attention is multi-scale deformable attention (:class:`vitsplit.ops.ms_deform_attn.MSDeformAttn`):
  the injector's queries (ViT tokens) attend to the three spatial levels, the extractor's queries
  (the spatial features) to the one ViT map; reference points are the queries' own pixel centres.
- ConvFFN: Linear(C, C/4), a 3x3 depth-wise conv applied to each level's map separately, GELU,
  Linear(C/4, C).

The spatial prior module is a ResNet-like stem (Conv-BN-ReLU x3, max-pool) and three stride-2
Conv-BN-ReLU stages (64, 128, 256, 256 channels), with 1x1 convs projecting each stage to C.
Norms are BatchNorm (the release's SyncBatchNorm; the trainer converts it under multi-GPU DDP).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.ms_deform_attn import MSDeformAttn


def layer_norm(dim: int) -> nn.LayerNorm:
    """The release's norm layer: LayerNorm with eps 1e-6."""
    return nn.LayerNorm(dim, eps=1e-6)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """(B, 3, H, W) -> c1 (B, C, ceil(H/4), .) and c2, c3, c4 at strides 8, 16, 32 (B, C, h_i, w_i).

    ``inplanes`` is the release's ``conv_inplane`` (64).
    """

    def __init__(self, inplanes: int = 64, embed_dim: int = 384):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, inplanes, 2),
            *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)


class DWConv(nn.Module):
    """3x3 depth-wise conv (with bias) on each level of a flattened multi-level sequence.

    forward(x (B, S, D), shapes [(h_l, w_l)]) -> (B, S, D), S = sum h_l * w_l.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        b, _, d = x.shape
        outs, start = [], 0
        for h, w in shapes:
            level = x[:, start : start + h * w].transpose(1, 2).reshape(b, d, h, w)
            outs.append(self.dwconv(level).flatten(2).transpose(1, 2))
            start += h * w
        return torch.cat(outs, dim=1)


class ConvFFN(nn.Module):
    """Linear(C, hidden) -> DWConv -> GELU -> Linear(hidden, C); (B, S, C) -> (B, S, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): zero a sample's residual branch with
    probability ``p`` in training and scale the kept ones by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Injector(nn.Module):
    """ViT tokens <- ViT tokens + gamma * MSDeformAttn(norm(tokens) -> norm(spatial), 3 levels).

    gamma starts at ``init_values``.
    """

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, init_values: float = 0.0):
        super().__init__()
        self.query_norm = layer_norm(dim)
        self.feat_norm = layer_norm(dim)
        self.attn = MSDeformAttn(dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(
        self, query: torch.Tensor, ref: torch.Tensor, feat: torch.Tensor, shapes: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """query (B, N, C) ViT tokens; ref (1, N, 1, 2); feat (B, S, C) spatial features on ``shapes`` -> (B, N, C)."""
        return query + self.gamma * self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """Spatial features <- + MSDeformAttn(norm(spatial) -> norm(ViT tokens), 1 level), then + ConvFFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float = 0.25,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.query_norm = layer_norm(dim)
        self.feat_norm = layer_norm(dim)
        self.attn = MSDeformAttn(dim, n_levels=1, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = layer_norm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        query: torch.Tensor,
        ref: torch.Tensor,
        feat: torch.Tensor,
        feat_shape: tuple[int, int],
        query_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, S, C) spatial features on ``query_shapes``; ref (1, S, 1, 2); feat (B, N, C) ViT
        tokens on the grid ``feat_shape`` -> (B, S, C)."""
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), [feat_shape])
        return query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))


class InteractionBlock(nn.Module):
    """Injector -> a group of ViT blocks -> extractor (-> two extra extractors in the last block)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
        init_values: float,
        extra_extractors: bool,
    ):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, deform_ratio, init_values)
        self.extractor = Extractor(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path)
        self.extra_extractors = nn.ModuleList(
            [
                Extractor(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path)
                for _ in range(2 if extra_extractors else 0)
            ]
        )

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        blocks: Sequence[nn.Module],
        grid: tuple[int, int],
        shapes: Sequence[tuple[int, int]],
        ref_vit: torch.Tensor,
        ref_sp: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C) ViT tokens on ``grid``; c (B, S, C) spatial features on ``shapes``; ref_vit
        (1, N, 1, 2) and ref_sp (1, S, 1, 2) their pixel centres. Returns the updated (x, c)."""
        x = self.injector(x, ref_vit, c, shapes)
        for blk in blocks:
            x = blk(x)
        c = self.extractor(c, ref_sp, x, grid, shapes)
        for ext in self.extra_extractors:
            c = ext(c, ref_sp, x, grid, shapes)
        return x, c


def init_adapter_weights(module: nn.Module) -> None:
    """The release's init of the adapter's own layers: Linear truncated-normal(std 0.02) with zero
    bias; LayerNorm/BatchNorm weight 1, bias 0; Conv2d/ConvTranspose2d normal(0, sqrt(2 / fan_out))
    with fan_out = k_h * k_w * out_channels / groups, zero bias. Deformable attention layers are
    then re-initialised by their own rule (:meth:`MSDeformAttn.reset_parameters`)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, C, h, w) to ``size``; identity when equal.
    For a size that is 4x, 2x or 0.5x the input this equals the release's ``scale_factor`` resize."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
