"""ViT-CoMer (Xia et al., "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature
Interaction for Dense Predictions", CVPR 2024) on a toolkit backbone: a plain ViT plus a CNN branch
(ViT-Adapter's spatial prior module) refined by an MRFP and fused with the ViT by CTI modules at
four interactions (:mod:`.comer_blocks`), producing a four-level pyramid (strides 4, 8, 16, 32).

Forward (the release's ``ViTCoMer.forward``):
1. The spatial prior module gives c1 (1/4) and c2, c3, c4 (1/8, 1/16, 1/32); c2-c4 get a learned
   level embedding each and are flattened and concatenated into c (B, S, C).
2. Patch embedding plus position embedding (resized to the grid, prefix slots dropped): x (B, N, C).
3. For each interaction group [first, last]: :class:`~.comer_blocks.CoMerInteraction`; the ViT map
   after each group is kept.
4. c is split into c2, c3, c4; c1 <- ConvTranspose2d(c2) (2x) + c1; the four kept ViT maps are
   resized to the four levels and added; a BatchNorm per level.

Steps 1, 2 and 4 are ViT-Adapter's (:mod:`.vit_adapter`), and so are the geometry (padding to the
patch size, every level at its conv's size), the stochastic depth of the ViT blocks, the frozen
unused backbone parameters and the init (``init_adapter_weights``, then ``MSDeformAttn``'s own).

The released configurations are in :data:`PUBLISHED_COMERS`, keyed by (depth, width): ViT-CoMer-T/S/B
(``upernet_vit_comer_{tiny,small,base}_512_160k_ade20k``, DeiT-T/S/B); the 24-block row takes the
backbone settings of the release's only ViT-CoMer-L segmentation config (Mask2Former on BEiTv2-L,
COCO-Stuff), whose ``dim_ratio`` is the class default 6.0. Other backbones get :func:`comer_config`'s rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..backbones import Backbone
from ..errors import UserError
from ..ops.ms_deform_attn import reference_points
from .adapter_blocks import SpatialPriorModule, init_adapter_weights, resize_to
from .comer_blocks import CoMerInteraction, split_levels
from .vit_adapter import check_interaction_groups, check_vit_family, interaction_groups, prepare_vit, vit_tokens

DEFAULT_DIM_RATIO = 6.0  # the release's ViTCoMer default MRFP width ratio (configs without dim_ratio)


@dataclass(frozen=True)
class CoMerConfig:
    """One ViT-CoMer configuration (the release's ``ViTCoMer`` arguments).

    ``interaction_indexes``: [first, last] ViT block of each of the four groups; ``deform_num_heads``,
    ``n_points``, ``deform_ratio``: the deformable attention's heads, points and value ratio;
    ``dim_ratio``: MRFP hidden width / C; ``cffn_ratio``: ConvFFN hidden width / C; ``conv_inplane``:
    the spatial prior stem's width; ``drop_path_rate``: stochastic depth, linear over the ViT blocks
    and constant in every CTI module; ``init_values``: CTI-to-ViT's gamma at start.
    """

    interaction_indexes: tuple[tuple[int, int], ...]
    deform_num_heads: int
    deform_ratio: float
    drop_path_rate: float
    dim_ratio: float = DEFAULT_DIM_RATIO
    n_points: int = 4
    cffn_ratio: float = 0.25
    conv_inplane: int = 64
    init_values: float = 0.0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interaction_indexes"] = [list(g) for g in self.interaction_indexes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CoMerConfig":
        return cls(**{**d, "interaction_indexes": tuple(tuple(int(i) for i in g) for g in d["interaction_indexes"])})


PUBLISHED_COMERS: dict[tuple[int, int], CoMerConfig] = {
    (12, 192): CoMerConfig(
        interaction_groups(12), 6, 1.0, 0.1, dim_ratio=DEFAULT_DIM_RATIO, source="published ViT-CoMer-T"
    ),
    (12, 384): CoMerConfig(interaction_groups(12), 6, 1.0, 0.2, dim_ratio=1.5, source="published ViT-CoMer-S"),
    (12, 768): CoMerConfig(interaction_groups(12), 12, 0.5, 0.3, dim_ratio=1.0, source="published ViT-CoMer-B"),
    (24, 1024): CoMerConfig(
        interaction_groups(24), 16, 0.5, 0.3, source="released ViT-CoMer-L backbone (Mask2Former BEiTv2-L config)"
    ),
}


def comer_config(num_layers: int, embed_dim: int, num_heads: int) -> CoMerConfig:
    """The released configuration for (depth, width) if there is one; else the rule the released ones
    follow: four equal groups, as many deformable heads as the ViT has heads, deform_ratio 0.5 for
    widths of 768 and more (1.0 below), dim_ratio 6.0 (the class default), stochastic depth 0.2."""
    if (num_layers, embed_dim) in PUBLISHED_COMERS:
        return PUBLISHED_COMERS[(num_layers, embed_dim)]
    ratio = 0.5 if embed_dim >= 768 else 1.0
    if (embed_dim * ratio) % num_heads:
        raise UserError(
            f"ViT-CoMer's deformable attention needs width x ratio ({embed_dim} x {ratio}) divisible by "
            f"its {num_heads} heads"
        )
    return CoMerConfig(
        interaction_groups(num_layers),
        num_heads,
        ratio,
        0.2,
        source=f"rule (4 groups of {num_layers // 4} blocks, {num_heads} heads, ratio {ratio})",
    )


class ViTCoMer(nn.Module):
    """``ViTCoMer(backbone, config=None)``: (B, 3, H, W) normalised images -> four maps
    [(B, C, ceil(H'/4), .), 1/8, 1/16, 1/32] (H' = H padded to a multiple of the patch size).

    Takes over ``backbone`` (its blocks get stochastic depth; every used parameter is trained).
    """

    def __init__(self, backbone: Backbone, config: CoMerConfig | None = None):
        super().__init__()
        check_vit_family(backbone, "ViT-CoMer")
        cfg = config or comer_config(backbone.num_layers, backbone.embed_dim, backbone.vit.blocks[0].attn.num_heads)
        check_interaction_groups(cfg.interaction_indexes, backbone.num_layers)
        self.backbone, self.config = backbone, cfg
        c = backbone.embed_dim
        self.level_embed = nn.Parameter(torch.zeros(3, c))
        self.spm = SpatialPriorModule(cfg.conv_inplane, c)
        n = len(cfg.interaction_indexes)
        self.interactions = nn.ModuleList(
            [
                CoMerInteraction(
                    c,
                    cfg.deform_num_heads,
                    cfg.n_points,
                    cfg.deform_ratio,
                    cfg.cffn_ratio,
                    cfg.drop_path_rate,
                    cfg.init_values,
                    mrfp_hidden=int(c * cfg.dim_ratio),
                    extra=(i == n - 1),
                )
                for i in range(n)
            ]
        )
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for _ in range(4)])
        for part in (self.spm, self.interactions, self.up):
            init_adapter_weights(part)
        nn.init.normal_(self.level_embed)
        prepare_vit(backbone, cfg.drop_path_rate)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) ImageNet-normalised -> [f1, f2, f3, f4], each (B, C, h_i, w_i) at strides
        4, 8, 16, 32 (the ViT's own normalisation, centre-padded to a multiple of the patch size)."""
        x = self.backbone.to_model_input(images)
        c1, c2, c3, c4 = self.spm(x)
        shapes = [tuple(t.shape[-2:]) for t in (c2, c3, c4)]
        c = torch.cat([t.flatten(2).transpose(1, 2) + self.level_embed[i] for i, t in enumerate((c2, c3, c4))], dim=1)
        tokens, grid = vit_tokens(self.backbone, x)
        b, _, dim = tokens.shape
        ref = reference_points(shapes, device=x.device, dtype=tokens.dtype)
        blocks = self.backbone.vit.blocks
        vit_maps = []
        for layer, (first, last) in zip(self.interactions, self.config.interaction_indexes):
            tokens, c = layer(tokens, c, [blocks[i] for i in range(first, last + 1)], grid, shapes, ref)
            vit_maps.append(tokens.transpose(1, 2).reshape(b, dim, *grid))
        c2, c3, c4 = split_levels(c, shapes)
        up = self.up(c2)[..., : c1.shape[-2], : c1.shape[-1]]  # 2*ceil(H/8) may exceed ceil(H/4) by one
        levels = [up + c1, c2, c3, c4]
        return [norm(f + resize_to(v, tuple(f.shape[-2:]))) for norm, f, v in zip(self.norms, levels, vit_maps)]
