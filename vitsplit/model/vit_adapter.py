"""ViT-Adapter (Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR 2023) on a
toolkit backbone: a plain ViT plus a spatial prior module and four injector/extractor interactions,
producing a four-level feature pyramid (strides 4, 8, 16, 32) for a dense-prediction head.

Forward (the release's ``ViTAdapter.forward``):
1. The spatial prior module turns the image into c1 (1/4) and c2, c3, c4 (1/8, 1/16, 1/32); c2-c4
   get a learned level embedding each and are flattened and concatenated into F_sp (B, S, C).
2. The patch embedding plus the position embedding (bicubically resized to the patch grid, prefix
   slot(s) dropped) gives the ViT tokens F_vit (B, N, C). No cls/register token takes part: the
   release sets ``cls_token = None`` and its forward uses patch tokens only.
3. For each interaction group [first, last] of ViT blocks: injector, blocks first..last, extractor
   (two extra extractors after the last group); the ViT map after each group is kept.
4. F_sp is split back into c2, c3, c4; c1 <- ConvTranspose2d(c2) (2x) + c1; the four kept ViT maps
   are bilinearly resized to the four levels and added; a BatchNorm per level.

The published configurations (interaction groups, deformable heads, ``deform_ratio``, stochastic
depth) are in :data:`PUBLISHED_ADAPTERS`, keyed by (depth, width); other backbones get
:func:`adapter_config`'s rule. The released ViT-Adapter-S/B/L segmentation configs use DeiT-S, DeiT-B
(patch 16, 224 px position embedding) and AugReg ViT-L (patch 16, 384 px position embedding).

Geometry here is general (the release assumes patch 16 and an input divisible by 32): the image is
padded to a multiple of the patch size (as the backbone does), every level's size is the one its
conv produced, reference points are pixel centres normalised per level, and the ViT maps are
resized to each level's actual size. For patch 16 and inputs divisible by 32 this is the release's
computation exactly; for DINOv2 (patch 14) the ViT grid (e.g. 37 at 518 px) simply differs from the
1/16 level (33), which deformable attention's normalised coordinates handle.

Backbone parameters that the forward never uses (cls/register tokens, the final norm, any pooling
head) are frozen (``requires_grad=False``) so that they count neither as trainable nor as unused
under DDP. Backbones: timm ``VisionTransformer`` models (DeiT, AugReg, DINOv2, CLIP, ...), whose
blocks take the tokens alone; RoPE (Eva: DINOv3, EVA-02) and SAM backbones are refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..backbones.families import ViTFamily
from ..errors import UserError
from ..ops.ms_deform_attn import reference_points
from .adapter_blocks import DropPath, InteractionBlock, SpatialPriorModule, init_adapter_weights, resize_to


@dataclass(frozen=True)
class AdapterConfig:
    """One ViT-Adapter configuration (the release's ``ViTAdapter`` arguments).

    ``interaction_indexes``: [first, last] ViT block of each of the four groups; ``deform_num_heads``,
    ``n_points``, ``deform_ratio``: the deformable attention's heads, points per head and level, and
    value-channel ratio; ``cffn_ratio``: ConvFFN hidden width / C; ``conv_inplane``: the spatial
    prior stem's width; ``drop_path_rate``: stochastic depth, linearly increasing over the ViT
    blocks and constant in every extractor (as the release passes it); ``init_values``: the
    injectors' gamma at start; ``source``: where the values come from.
    """

    interaction_indexes: tuple[tuple[int, int], ...]
    deform_num_heads: int
    deform_ratio: float
    drop_path_rate: float
    n_points: int = 4
    cffn_ratio: float = 0.25
    conv_inplane: int = 64
    init_values: float = 0.0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interaction_indexes"] = [list(g) for g in self.interaction_indexes]
        return d


_GROUPS_12 = ((0, 2), (3, 5), (6, 8), (9, 11))
_GROUPS_24 = ((0, 5), (6, 11), (12, 17), (18, 23))

# The released ADE20K UperNet configs (upernet_{deit,augreg}_adapter_{small,base,large}_512_160k_ade20k),
# keyed by (ViT depth, width).
PUBLISHED_ADAPTERS: dict[tuple[int, int], AdapterConfig] = {
    (12, 384): AdapterConfig(
        _GROUPS_12, deform_num_heads=6, deform_ratio=1.0, drop_path_rate=0.2, source="published ViT-Adapter-S"
    ),
    (12, 768): AdapterConfig(
        _GROUPS_12, deform_num_heads=12, deform_ratio=0.5, drop_path_rate=0.3, source="published ViT-Adapter-B"
    ),
    (24, 1024): AdapterConfig(
        _GROUPS_24, deform_num_heads=16, deform_ratio=0.5, drop_path_rate=0.4, source="published ViT-Adapter-L"
    ),
}


def interaction_groups(num_layers: int) -> tuple[tuple[int, int], ...]:
    """Four equal consecutive groups of blocks, [first, last] each: the published S/B (12 blocks)
    and L (24) interaction indexes follow this rule. Raises ``UserError`` if ``num_layers`` is not a
    positive multiple of 4."""
    if num_layers < 4 or num_layers % 4:
        raise UserError(
            f"ViT-Adapter splits the ViT into four equal groups of blocks; a ViT with {num_layers} blocks "
            "does not split (use a depth divisible by 4)"
        )
    g = num_layers // 4
    return tuple((i * g, (i + 1) * g - 1) for i in range(4))


def adapter_config(num_layers: int, embed_dim: int, num_heads: int) -> AdapterConfig:
    """The published configuration for (depth, width) if there is one; else the rule the published
    ones follow: :func:`interaction_groups`, as many deformable heads as the ViT has heads,
    deform_ratio 0.5 for widths of 768 and more (1.0 below), stochastic depth 0.2."""
    if (num_layers, embed_dim) in PUBLISHED_ADAPTERS:
        return PUBLISHED_ADAPTERS[(num_layers, embed_dim)]
    groups = interaction_groups(num_layers)
    ratio = 0.5 if embed_dim >= 768 else 1.0
    if (embed_dim * ratio) % num_heads:
        raise UserError(
            f"ViT-Adapter's deformable attention needs width x ratio ({embed_dim} x {ratio}) divisible by "
            f"its {num_heads} heads"
        )
    return AdapterConfig(
        groups,
        deform_num_heads=num_heads,
        deform_ratio=ratio,
        drop_path_rate=0.2,
        source=f"rule (4 groups of {num_layers // 4} blocks, {num_heads} heads, ratio {ratio})",
    )


USED_VIT_PARAMS = ("blocks.", "patch_embed.", "pos_embed", "norm_pre.")  # what the adapter's forward runs


def check_vit_family(backbone: Backbone, what: str) -> None:
    """Refuse a backbone whose blocks need more than the tokens (RoPE, SAM): ``UserError``."""
    if not isinstance(backbone.family, ViTFamily):
        raise UserError(
            f"{what} is built for timm VisionTransformer backbones (DeiT, AugReg, DINOv2, ...); "
            f"{backbone.name} is a {backbone.family.name} model, whose blocks need more than the tokens"
        )


def check_interaction_groups(indexes: Sequence[Sequence[int]], num_layers: int) -> None:
    """Four consecutive [first, last] groups covering blocks 0..num_layers-1, else ``UserError``."""
    groups = [tuple(int(i) for i in g) for g in indexes]
    if (
        len(groups) != 4
        or groups[0][0] != 0
        or groups[-1][1] != num_layers - 1
        or any(b[0] != a[1] + 1 or b[1] < b[0] for a, b in zip(groups, groups[1:]))
    ):
        raise UserError(
            f"interaction indexes {groups} must be four consecutive groups covering blocks 0..{num_layers - 1}"
        )


def prepare_vit(backbone: Backbone, drop_path_rate: float) -> None:
    """Stochastic depth linearly increasing over the ViT blocks (DeiT/timm's rule, as the releases
    build their ViTs), and every parameter the forward does not run (cls/register tokens, final norm,
    pooling head) frozen, so that it counts neither as trainable nor as unused under DDP."""
    vit = backbone.vit
    rates = torch.linspace(0, drop_path_rate, backbone.num_layers, device="cpu").tolist()
    for blk, rate in zip(vit.blocks, rates):
        if rate > 0:
            blk.drop_path1, blk.drop_path2 = DropPath(rate), DropPath(rate)
    for name, p in vit.named_parameters():
        p.requires_grad_(name.startswith(USED_VIT_PARAMS))


def vit_tokens(backbone: Backbone, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Padded images (B, 3, H, W) -> patch tokens + position embedding (B, h*w, C), grid (h, w)
    (no prefix token: the releases drop the cls token)."""
    vit = backbone.vit
    t = vit.patch_embed(x)
    if t.dim() == 4:  # timm's dynamic-size patch embedding returns NHWC
        b, h, w, c = t.shape
        t = t.reshape(b, h * w, c)
    else:
        p = backbone.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
    pos = vit.pos_embed if vit.no_embed_class else vit.pos_embed[:, vit.num_prefix_tokens :]
    gh, gw = vit.patch_embed.grid_size
    if (gh, gw) != (h, w):
        pos = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    return vit.norm_pre(vit.pos_drop(t + pos)), (h, w)


class ViTAdapter(nn.Module):
    """``ViTAdapter(backbone, config=None)``: (B, 3, H, W) normalised images -> four maps
    [(B, C, ceil(H'/4), .), 1/8, 1/16, 1/32] (H' = H padded to a multiple of the patch size).

    Takes over ``backbone`` (its blocks get stochastic depth; every used parameter is trained).
    """

    def __init__(self, backbone: Backbone, config: AdapterConfig | None = None):
        super().__init__()
        check_vit_family(backbone, "ViT-Adapter")
        vit = backbone.vit
        cfg = config or adapter_config(backbone.num_layers, backbone.embed_dim, vit.blocks[0].attn.num_heads)
        check_interaction_groups(cfg.interaction_indexes, backbone.num_layers)
        self.backbone, self.config = backbone, cfg
        c = backbone.embed_dim
        self.level_embed = nn.Parameter(torch.zeros(3, c))
        self.spm = SpatialPriorModule(cfg.conv_inplane, c)
        self.interactions = nn.ModuleList(
            [
                InteractionBlock(
                    c,
                    cfg.deform_num_heads,
                    cfg.n_points,
                    cfg.deform_ratio,
                    cfg.cffn_ratio,
                    cfg.drop_path_rate,
                    cfg.init_values,
                    extra_extractors=(i == len(cfg.interaction_indexes) - 1),
                )
                for i in range(len(cfg.interaction_indexes))
            ]
        )
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for _ in range(4)])
        init_adapter_weights(self.spm)
        init_adapter_weights(self.interactions)
        init_adapter_weights(self.up)
        nn.init.normal_(self.level_embed)
        prepare_vit(backbone, cfg.drop_path_rate)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return vit_tokens(self.backbone, x)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) ImageNet-normalised -> [f1, f2, f3, f4], each (B, C, h_i, w_i) at strides
        4, 8, 16, 32. The spatial prior module sees what the ViT sees: the backbone's own normalisation,
        centre-padded to a multiple of the patch size."""
        x = self.backbone.to_model_input(images)
        c1, c2, c3, c4 = self.spm(x)
        shapes = [tuple(t.shape[-2:]) for t in (c2, c3, c4)]
        c = torch.cat([t.flatten(2).transpose(1, 2) + self.level_embed[i] for i, t in enumerate((c2, c3, c4))], dim=1)
        tokens, grid = self._tokens(x)
        b, _, dim = tokens.shape
        ref_vit = reference_points([grid], device=x.device, dtype=tokens.dtype)
        ref_sp = reference_points(shapes, device=x.device, dtype=tokens.dtype)
        blocks = self.backbone.vit.blocks
        vit_maps = []
        for layer, (first, last) in zip(self.interactions, self.config.interaction_indexes):
            tokens, c = layer(tokens, c, [blocks[i] for i in range(first, last + 1)], grid, shapes, ref_vit, ref_sp)
            vit_maps.append(tokens.transpose(1, 2).reshape(b, dim, *grid))
        sizes = [h * w for h, w in shapes]
        c2, c3, c4 = (t.transpose(1, 2).reshape(b, dim, *hw) for t, hw in zip(torch.split(c, sizes, dim=1), shapes))
        up = self.up(c2)[..., : c1.shape[-2], : c1.shape[-1]]  # 2*ceil(H/8) may exceed ceil(H/4) by one
        levels = [up + c1, c2, c3, c4]
        return [norm(f + resize_to(v, tuple(f.shape[-2:]))) for norm, f, v in zip(self.norms, levels, vit_maps)]
