"""The building blocks of ViT-CoMer (Xia et al., "ViT-CoMer: Vision Transformer with Convolutional
Multi-scale Feature Interaction for Dense Predictions", CVPR 2024): the multi-receptive-field feature
pyramid (MRFP) and the CNN-Transformer bidirectional interaction (CTI), as the release computes them.

Notation: x (B, N, C) are the ViT's patch tokens on its grid (h, w); c (B, S, C) the CNN pyramid,
the 1/8, 1/16 and 1/32 maps of the spatial prior module (ViT-Adapter's, reused:
:class:`~vitsplit.model.adapter_blocks.SpatialPriorModule`) flattened and concatenated, S = s_8 +
s_16 + s_32. Every deformable attention here is *self*-attention over the three CNN levels
(:class:`~vitsplit.ops.ms_deform_attn.MSDeformAttn`, 3 levels, the queries' own pixel centres as
reference points): the release computes its reference points for the pyramid in every CTI module.

- MRFP (one per interaction): c <- Linear(C, r*C) -> per level, the channels in two halves, a 3x3
  and a 5x5 depth-wise conv (the multiple receptive fields), BatchNorm, GELU -> Linear(r*C, C); no
  residual (the release replaces c). r is ``dim_ratio`` (1.5 for S, 1.0 for B, 6.0 otherwise).
- Then the ViT tokens are added to the 1/16 level: c_16 <- c_16 + x.
- CTI to ViT: a = MSDeformAttn(norm(c) -> norm(c)); a <- a + ConvFFN(norm(a)); the three levels of
  a are resized to the ViT grid and summed, and x <- x + gamma * sum (gamma starts at 0, as the
  injector's).
- The ViT blocks of the group run on x.
- CTI to CNN: c_16 <- c_16 + x; c <- n + MSDeformAttn(norm'(n) -> norm'(m)) with n = norm_q(c) and
  m = norm_f(c) (the release's nested norms: the residual base is the normed pyramid); then
  c <- c + ConvFFN(norm(c)).
- The last interaction has four extra CTI-to-CNN modules, each with a ConvFFN step
  (c <- c + ConvFFN(norm(c))) between the token addition and the attention.

ConvFFN is ViT-Adapter's (:class:`~vitsplit.model.adapter_blocks.ConvFFN`, hidden C/4); norms are
LayerNorm with eps 1e-6 except MRFP's BatchNorm. Geometry: the release assumes patch 16 and inputs
divisible by 32 (so the ViT grid is the 1/16 level); here the ViT map is bilinearly resized to the
1/16 level's size and the levels to the ViT grid (identities, or the release's 2x / 0.5x resizes,
in that case), so DINOv2's patch 14 works too.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops.ms_deform_attn import MSDeformAttn
from .adapter_blocks import ConvFFN, DropPath, layer_norm, resize_to

MRFP_KERNELS = (3, 5)  # the release's two receptive fields per level (depth-wise kernel sizes)
VIT_LEVEL = 1  # the 1/16 level, where the ViT tokens meet the pyramid


def split_levels(c: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, S, D) on ``shapes`` -> one (B, D, h_l, w_l) map per level."""
    b, _, d = c.shape
    out, start = [], 0
    for h, w in shapes:
        out.append(c[:, start : start + h * w].transpose(1, 2).reshape(b, d, h, w))
        start += h * w
    return out


def join_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """One (B, D, h_l, w_l) map per level -> (B, S, D)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def add_tokens_to_level(
    c: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], shapes: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """c (B, S, C) with the ViT tokens x (B, N, C on ``grid``), resized to the 1/16 level, added there."""
    maps = split_levels(c, shapes)
    vit = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    maps[VIT_LEVEL] = maps[VIT_LEVEL] + resize_to(vit, tuple(maps[VIT_LEVEL].shape[-2:]))
    return join_levels(maps)


class MultiReceptiveDWConv(nn.Module):
    """Per level: channels [0, D/2) through a 3x3 and [D/2, D) through a 5x5 depth-wise conv (with
    bias), concatenated, BatchNorm, GELU. (B, S, D) on three levels -> (B, S, D)."""

    def __init__(self, dim: int, levels: int = 3, kernels: Sequence[int] = MRFP_KERNELS):
        super().__init__()
        if len(kernels) != 2:
            raise ValueError("MultiReceptiveDWConv takes two kernel sizes (one per half of the channels)")
        self.parts = (dim // 2, dim - dim // 2)
        self.convs = nn.ModuleList(
            [
                nn.ModuleList([nn.Conv2d(n, n, k, padding=k // 2, groups=n) for n, k in zip(self.parts, kernels)])
                for _ in range(levels)
            ]
        )
        self.norms = nn.ModuleList([nn.BatchNorm2d(dim) for _ in range(levels)])
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        out = []
        for level, convs, norm in zip(split_levels(x, shapes), self.convs, self.norms):
            halves = torch.split(level, self.parts, dim=1)
            out.append(self.act(norm(torch.cat([conv(h) for conv, h in zip(convs, halves)], dim=1))))
        return join_levels(out)


class MRFP(nn.Module):
    """Multi-receptive-field feature pyramid: Linear(C, hidden) -> MultiReceptiveDWConv -> GELU ->
    Linear(hidden, C); (B, S, C) -> (B, S, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = MultiReceptiveDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, c: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(c), shapes)))


class PyramidSelfAttention(nn.Module):
    """q <- q + MSDeformAttn(norm(q) -> norm(feat), 3 levels); q <- q + ConvFFN(norm(q)).
    (The release's ``MultiscaleExtractor``.) q, feat (B, S, C) on ``shapes``; ref (1, S, 1, 2)."""

    def __init__(
        self, dim: int, num_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float, drop_path: float
    ):
        super().__init__()
        self.query_norm, self.feat_norm, self.ffn_norm = layer_norm(dim), layer_norm(dim), layer_norm(dim)
        self.attn = MSDeformAttn(dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, q: torch.Tensor, feat: torch.Tensor, ref: torch.Tensor, shapes: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        q = q + self.attn(self.query_norm(q), ref, self.feat_norm(feat), shapes)
        return q + self.drop_path(self.ffn(self.ffn_norm(q), shapes))


class CTIToViT(nn.Module):
    """x <- x + gamma * sum_l resize_l(a), a = attended and ConvFFN-refined pyramid (module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
        init_values: float = 0.0,
    ):
        super().__init__()
        self.query_norm, self.feat_norm, self.ffn_norm = layer_norm(dim), layer_norm(dim), layer_norm(dim)
        self.attn = MSDeformAttn(dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        ref: torch.Tensor,
        grid: tuple[int, int],
        shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """x (B, N, C) on ``grid``; c (B, S, C) on ``shapes``; ref (1, S, 1, 2) -> (B, N, C)."""
        a = self.attn(self.query_norm(c), ref, self.feat_norm(c), shapes)
        a = a + self.drop_path(self.ffn(self.ffn_norm(a), shapes))
        fused = sum(resize_to(m, grid) for m in split_levels(a, shapes))
        return x + self.gamma * fused.flatten(2).transpose(1, 2)


class CTIToCNN(nn.Module):
    """c_16 += x; (``with_ffn``: c += ConvFFN(norm(c))); c <- PyramidSelfAttention(norm_q(c), norm_f(c)).
    With ``with_ffn`` this is the release's ``Extractor_CTI`` (the last interaction's extra modules)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
        with_ffn: bool = False,
    ):
        super().__init__()
        self.query_norm, self.feat_norm = layer_norm(dim), layer_norm(dim)
        if with_ffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = layer_norm(dim)
            self.drop_path = DropPath(drop_path)
        self.with_ffn = with_ffn
        self.inter = PyramidSelfAttention(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path)

    def forward(
        self,
        c: torch.Tensor,
        x: torch.Tensor,
        ref: torch.Tensor,
        grid: tuple[int, int],
        shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """c (B, S, C) on ``shapes``; x (B, N, C) on ``grid``; ref (1, S, 1, 2) -> (B, S, C)."""
        c = add_tokens_to_level(c, x, grid, shapes)
        if self.with_ffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), shapes))
        return self.inter(self.query_norm(c), self.feat_norm(c), ref, shapes)


EXTRA_CTIS = 4  # the release's extra CTI-to-CNN modules after the last interaction


class CoMerInteraction(nn.Module):
    """MRFP -> c_16 += x -> CTI to ViT -> a group of ViT blocks -> CTI to CNN (-> 4 extra in the last)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
        init_values: float,
        mrfp_hidden: int,
        extra: bool,
    ):
        super().__init__()
        args = (dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path)
        self.mrfp = MRFP(dim, mrfp_hidden)
        self.cti_tov = CTIToViT(*args, init_values=init_values)
        self.cti_toc = CTIToCNN(*args)
        self.extra_ctis = nn.ModuleList([CTIToCNN(*args, with_ffn=True) for _ in range(EXTRA_CTIS if extra else 0)])

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        blocks: Sequence[nn.Module],
        grid: tuple[int, int],
        shapes: Sequence[tuple[int, int]],
        ref: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C) ViT tokens on ``grid``; c (B, S, C) pyramid on ``shapes``; ref (1, S, 1, 2) its
        pixel centres. Returns the updated (x, c)."""
        c = add_tokens_to_level(self.mrfp(c, shapes), x, grid, shapes)
        x = self.cti_tov(x, c, ref, grid, shapes)
        for blk in blocks:
            x = blk(x)
        c = self.cti_toc(c, x, ref, grid, shapes)
        for cti in self.extra_ctis:
            c = cti(c, x, ref, grid, shapes)
        return x, c
