"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), in plain PyTorch.

The operator (eq. 3 of the paper): for query q with reference point p_q (normalised to [0, 1]^2),

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x^l(phi_l(p_q) + dp_mlqk) ]

with M heads, L levels, K (here P) sampling points per head and level; the attention weights
A_mlqk are a softmax over the L*P (level, point) pairs of a head. ``ms_deform_attn`` is the
inner part (the bilinear sampling and the weighted sum, what the authors' CUDA kernel computes);
``MSDeformAttn`` adds the four linear layers (sampling offsets, attention weights, value
projection, output projection) and the reference-point geometry.

Sampling semantics are those of the CUDA kernel (``ms_deform_attn_im2col_bilinear``): a location
``(x, y)`` in [0, 1] on a level of size ``H x W`` is read at pixel coordinates
``(x * W - 0.5, y * H - 0.5)`` (pixel centres at integer + 0.5, i.e. align_corners=False),
bilinearly from the four neighbours, with neighbours outside the map read as 0 (zero padding).
That is exactly ``F.grid_sample(value, 2 * loc - 1, mode="bilinear", padding_mode="zeros",
align_corners=False)``, which is what this file uses: no compiled extension is needed, and the
gradients with respect to the value, the locations and the weights are autograd's.

The ``ratio`` argument of :class:`MSDeformAttn` is ViT-Adapter's (Chen et al., ICLR 2023): the
value projection maps C -> int(C * ratio) channels and the output projection maps them back.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Sequence[Sequence[int]] | torch.Tensor


def _shapes_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """(L, 2) tensor or sequence of (H, W) -> list of Python int pairs."""
    if torch.is_tensor(spatial_shapes):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}")
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    shapes = [tuple(int(v) for v in hw) for hw in spatial_shapes]
    if any(len(hw) != 2 for hw in shapes):
        raise ValueError(f"spatial_shapes must be (H, W) pairs, got {shapes}")
    return shapes  # type: ignore[return-value]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The core of multi-scale deformable attention: sample, weight, sum.

    Args:
        value: Tensor[B, S, M, D], the (projected) values of every level, levels concatenated in
            order, each level flattened row-major; S = sum_l H_l * W_l, M heads of D channels.
        spatial_shapes: the (H_l, W_l) of each level, as a (L, 2) integer tensor or a sequence.
        sampling_locations: Tensor[B, Q, M, L, P, 2], (x, y) normalised so that 0 and 1 are the
            outer edges of the map (CUDA-kernel / align_corners=False semantics, see the module
            docstring); locations outside read zeros.
        attention_weights: Tensor[B, Q, M, L, P] (the caller normalises them; MSDeformAttn uses a
            softmax over L*P).

    Returns:
        Tensor[B, Q, M*D]: for each query, the heads' weighted sums concatenated head-major.
    """
    shapes = _shapes_list(spatial_shapes)
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, M, D), got shape {tuple(value.shape)}")
    b, s, m, d = value.shape
    n_levels = len(shapes)
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(
            f"spatial_shapes {shapes} hold {sum(h * w for h, w in shapes)} positions but value "
            f"{tuple(value.shape)} has S = {s}"
        )
    if (
        sampling_locations.dim() != 6
        or sampling_locations.shape[0] != b
        or sampling_locations.shape[2] != m
        or sampling_locations.shape[3] != n_levels
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"sampling_locations must be (B={b}, Q, M={m}, L={n_levels}, P, 2), got {tuple(sampling_locations.shape)}"
        )
    q, p = sampling_locations.shape[1], sampling_locations.shape[4]
    if tuple(attention_weights.shape) != (b, q, m, n_levels, p):
        raise ValueError(
            f"attention_weights must be (B, Q, M, L, P) = {(b, q, m, n_levels, p)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w]  # (B, HW, M, D)
        start += h * w
        v = v.permute(0, 2, 3, 1).reshape(b * m, d, h, w)  # (B*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, q, p, 2)  # (B*M, Q, P, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*M, D, Q, P)
    stacked = torch.stack(sampled, dim=-2)  # (B*M, D, Q, L, P)
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, n_levels, p)
    out = (stacked * weights).sum(dim=(-2, -1))  # (B*M, D, Q)
    return out.view(b, m * d, q).transpose(1, 2)


def level_start_index(spatial_shapes: SpatialShapes) -> list[int]:
    """Offset of each level in the flattened sequence: [0, H_0*W_0, H_0*W_0 + H_1*W_1, ...]."""
    starts, total = [], 0
    for h, w in _shapes_list(spatial_shapes):
        starts.append(total)
        total += h * w
    return starts


def reference_points(
    spatial_shapes: SpatialShapes, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1]: ``((j + 0.5) / W, (i + 0.5) / H)``.

    Returns Tensor[1, sum_l H_l*W_l, 1, 2] as (x, y), levels in order, row-major; the two
    singleton dimensions broadcast over the batch and over the attended levels (the layout
    :class:`MSDeformAttn` takes, as in Deformable DETR's encoder and ViT-Adapter).
    """
    pts = []
    for h, w in _shapes_list(spatial_shapes):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=-1))
    return torch.cat(pts, dim=0)[None, :, None, :]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with its projections (Deformable DETR's ``MSDeformAttn``).

    Args:
        d_model: channels C of queries and input features.
        n_levels: feature levels L; n_heads: heads M; n_points: sampling points P per head and level.
        ratio: value channels = int(C * ratio) (ViT-Adapter's ``deform_ratio``; 1.0 in Deformable DETR).

    Layers: ``sampling_offsets`` Linear(C, M*L*P*2), ``attention_weights`` Linear(C, M*L*P),
    ``value_proj`` Linear(C, int(C*ratio)), ``output_proj`` Linear(int(C*ratio), C). Initialised as
    in the paper's release: offsets' weights 0 and biases pointing each head in its own direction
    (head m at angle 2*pi*m/M, point k at distance k+1 in units of the level's pixels), attention
    weights 0 (uniform softmax), projections Xavier-uniform with zero bias.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, ratio: float = 1.0):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"int(d_model * ratio) = {value_dim} must be divisible by n_heads = {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.ratio = (
            d_model,
            n_levels,
            n_heads,
            n_points,
            ratio,
        )
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack((angles.cos(), angles.sin()), dim=-1)  # (M, 2)
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values  # onto the square's border
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)  # (1, 1, P, 1)
        bias = direction.view(self.n_heads, 1, 1, 2) * steps  # (M, 1, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to P points per head around its reference point on every level.

        Args:
            query: Tensor[B, Q, C].
            reference_points: Tensor[B or 1, Q, L or 1, 2], (x, y) in [0, 1] (see
                :func:`reference_points`); offsets are added in units of each level's pixels.
            input_flatten: Tensor[B, S, C], the L levels flattened and concatenated (S = sum H_l W_l).
            spatial_shapes: the (H_l, W_l) of the levels, (L, 2) tensor or sequence.
            padding_mask: optional Tensor[B, S] bool, True where the input is padding (read as 0).

        Returns:
            Tensor[B, Q, C].
        """
        shapes = _shapes_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"this module attends to {self.n_levels} levels, got spatial_shapes {shapes}")
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be (B, Q, {self.d_model}), got {tuple(query.shape)}")
        b, q, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != b or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"input_flatten must be (B={b}, S, {self.d_model}), got {tuple(input_flatten.shape)}")
        if (
            reference_points.dim() != 4
            or reference_points.shape[-1] != 2
            or reference_points.shape[1] != q
            or reference_points.shape[0] not in (1, b)
            or reference_points.shape[2] not in (1, self.n_levels)
        ):
            raise ValueError(
                f"reference_points must be (B or 1, Q={q}, L={self.n_levels} or 1, 2), "
                f"got {tuple(reference_points.shape)}"
            )
        m, n_l, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            if tuple(padding_mask.shape) != tuple(input_flatten.shape[:2]):
                raise ValueError(
                    f"padding_mask must be (B, S) = {tuple(input_flatten.shape[:2])}, got {tuple(padding_mask.shape)}"
                )
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, value.shape[1], m, -1)  # (B, S, M, D)
        offsets = self.sampling_offsets(query).view(b, q, m, n_l, p, 2)
        weights = self.attention_weights(query).view(b, q, m, n_l * p).softmax(-1).view(b, q, m, n_l, p)
        normaliser = torch.tensor(
            [[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device
        )  # (L, 2) as (W, H)
        locations = (
            reference_points[:, :, None, :, None, :].to(offsets.dtype)
            + offsets / normaliser[None, None, None, :, None, :]
        )
        out = ms_deform_attn(value, shapes, locations, weights)  # (B, Q, M*D)
        return self.output_proj(out)
