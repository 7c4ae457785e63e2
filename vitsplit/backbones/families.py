"""How each family of timm ViTs is run one block at a time: token layout, prefix tokens, the
per-forward state a block needs, and the call of one block.

Every family shows the rest of the toolkit the same picture: a token sequence (B, T, C) with
T = num_prefix_tokens + h*w, prefix tokens (class token, registers) first, then the patch tokens of
the (h, w) grid in row-major order. What differs is hidden here:

- :class:`ViTFamily`: timm's ``VisionTransformer`` (Dosovitskiy et al. 2021) -- DINOv2 (Oquab et al.
  2023), CLIP (Radford et al. 2021), SigLIP / SigLIP 2 (Zhai et al. 2023; Tschannen et al. 2025),
  MAE (He et al. 2022). Absolute position embeddings are added once before block 0; a block maps
  (B, T, C) -> (B, T, C) and takes nothing else. SigLIP has no class token (zero prefix tokens, an
  attention-pool head that ViT-Split does not use).
- :class:`EvaFamily`: timm's ``Eva`` -- DINOv3 (Simeoni et al. 2025: class token + 4 registers, RoPE,
  patch 16) and EVA-02 (Fang et al. 2023: class token, absolute position embeddings and RoPE). Rotary
  position embeddings (Su et al. 2021; Heo et al. 2024 for images) are not added to the tokens: every
  block takes the embedding of the current patch grid as an argument, ``block(x, rope=...)``.
- :class:`SAMFamily`: timm's ``VisionTransformerSAM`` -- SAM image encoders (Kirillov et al. 2023),
  a ViTDet backbone (Li et al. 2022): no prefix tokens; a block maps a 2D token grid (B, h, w, C) ->
  (B, h, w, C), most blocks with windowed attention, some global, with relative position biases.
  SAM's neck (1x1 and 3x3 convolutions to 256 channels) serves its mask decoder and is not part of
  the token stream; the encoder has no final LayerNorm, so :meth:`Family.final_norm` is the identity.

The per-forward state (:class:`BlockContext`: the grid, and the RoPE embedding for that grid) is a
function of the grid alone in eval mode, so the task-head copies of ViT-Split get exactly what the
frozen backbone's blocks got from :meth:`Family.context`. (timm applies RoPE coordinate
augmentation only in training mode, and only when the model was built with it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class BlockContext:
    """What a block needs besides the tokens: the patch grid (h, w) and, for RoPE models, the
    rotary embedding of that grid (timm's layout, (h*w, 2*head_dim)), ``None`` for models without
    RoPE; ``rope_per_block``: the embedding is learned per block (timm's mixed RoPE, (L, heads, h*w,
    head_dim)) and block i takes ``rope[i]``."""

    grid: tuple[int, int]
    rope: torch.Tensor | None = None
    rope_per_block: bool = False


def _patch_size(patch_embed: nn.Module) -> int:
    ps = patch_embed.patch_size
    ph, pw = ps if isinstance(ps, (tuple, list)) else (ps, ps)
    if int(ph) != int(pw):
        raise UserError(f"patch size {tuple(ps)} is not square; only square patches are supported")
    return int(ph)


def _not_identity(m: Any) -> bool:
    return isinstance(m, nn.Module) and not isinstance(m, nn.Identity)


class Family:
    """The common interface; one subclass per timm architecture class."""

    name = ""

    def blocks(self, vit: nn.Module) -> nn.Module:
        """The transformer blocks, in order (an ``nn.ModuleList`` or ``nn.Sequential``)."""
        return vit.blocks

    def patch_size(self, vit: nn.Module) -> int:
        return _patch_size(vit.patch_embed)

    def num_prefix_tokens(self, vit: nn.Module) -> int:
        """Tokens in front of the patch tokens (class token + registers + distillation token)."""
        return int(getattr(vit, "num_prefix_tokens", 0))

    def has_class_token(self, vit: nn.Module) -> bool:
        return getattr(vit, "cls_token", None) is not None

    def final_norm(self, vit: nn.Module) -> nn.Module:
        """The frozen norm that ends the token stream: ``norm`` when the model has one, else
        ``fc_norm`` (timm moves the last LayerNorm there for models that pool by averaging,
        e.g. EVA-02; a LayerNorm acts on each token alike, so applying it per token is the same
        operation), else the identity."""
        for attr in ("norm", "fc_norm"):
            m = getattr(vit, attr, None)
            if _not_identity(m):
                return m
        return nn.Identity()

    def embed(self, vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
        """Images (B, 3, H, W), H and W multiples of the patch size -> tokens before block 0
        (B, T, C) and the context the blocks need."""
        raise NotImplementedError

    def context(self, vit: nn.Module, grid: tuple[int, int]) -> BlockContext:
        """The context of an (h, w) patch grid (what :meth:`embed` returns with its tokens)."""
        return BlockContext(grid=(int(grid[0]), int(grid[1])))

    def call_block(self, block: nn.Module, tokens: torch.Tensor, ctx: BlockContext, index: int) -> torch.Tensor:
        """Run one block (of this family; ``index`` its position in the backbone, 0-based) on
        tokens (B, T, C) -> (B, T, C)."""
        return block(tokens)


class ViTFamily(Family):
    """timm ``VisionTransformer``: absolute position embeddings, blocks take the tokens only."""

    name = "vit"

    def embed(self, vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
        p = self.patch_size(vit)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        return t, self.context(vit, grid)


class EvaFamily(Family):
    """timm ``Eva``: blocks take the RoPE embedding of the grid as an argument."""

    name = "eva"

    def embed(self, vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
        p = self.patch_size(vit)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        t = vit.patch_embed(x)
        t, rope = vit._pos_embed(t)  # timm's own embedding step (class token, registers, abs. pos.)
        t = vit.norm_pre(t)
        return t, BlockContext(grid=grid, rope=rope, rope_per_block=bool(getattr(vit, "rope_mixed", False)))

    def context(self, vit: nn.Module, grid: tuple[int, int]) -> BlockContext:
        grid = (int(grid[0]), int(grid[1]))
        rope_module = getattr(vit, "rope", None)
        if rope_module is None:
            return BlockContext(grid=grid)
        if getattr(vit, "dynamic_img_size", False):  # the calls Eva._pos_embed makes
            rope = rope_module.get_embed(shape=grid)
        elif hasattr(rope_module, "feat_shape"):
            rope = rope_module.get_embed()
        else:
            rope = rope_module.get_embed(shape=vit.patch_embed.grid_size)
        return BlockContext(grid=grid, rope=rope, rope_per_block=bool(getattr(vit, "rope_mixed", False)))

    def call_block(self, block: nn.Module, tokens: torch.Tensor, ctx: BlockContext, index: int) -> torch.Tensor:
        rope = ctx.rope[index] if ctx.rope is not None and ctx.rope_per_block else ctx.rope
        return block(tokens, rope=rope)


class SAMFamily(Family):
    """timm ``VisionTransformerSAM``: a 2D token grid per block, no prefix tokens, no final norm."""

    name = "sam"

    def num_prefix_tokens(self, vit: nn.Module) -> int:
        return 0

    def has_class_token(self, vit: nn.Module) -> bool:
        return False

    def final_norm(self, vit: nn.Module) -> nn.Module:
        return nn.Identity()

    def embed(self, vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
        from timm.layers import resample_abs_pos_embed_nhwc

        t = vit.patch_embed(x)  # (B, h, w, C)
        if vit.pos_embed is not None:  # SAM's (1, 64, 64, C) table, resampled to the grid as timm does
            t = t + resample_abs_pos_embed_nhwc(vit.pos_embed, t.shape[1:3])
        t = vit.norm_pre(vit.patch_drop(vit.pos_drop(t)))
        b, h, w, c = t.shape
        return t.reshape(b, h * w, c), self.context(vit, (h, w))

    def call_block(self, block: nn.Module, tokens: torch.Tensor, ctx: BlockContext, index: int) -> torch.Tensor:
        b, n, c = tokens.shape
        h, w = ctx.grid
        if n != h * w:
            raise UserError(f"SAM block {index} got {n} tokens for a {h}x{w} grid; SAM has no prefix tokens")
        return block(tokens.reshape(b, h, w, c)).reshape(b, n, c)


def family_of(vit: nn.Module) -> Family:
    """The family of a built timm model, or ``UserError`` naming the supported classes."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if isinstance(vit, VisionTransformer):
        return ViTFamily()
    if isinstance(vit, Eva):
        return EvaFamily()
    if isinstance(vit, VisionTransformerSAM):
        return SAMFamily()
    raise UserError(
        f"{type(vit).__name__} is not a plain ViT this tool can split: use a timm VisionTransformer "
        "(DINOv2, CLIP, SigLIP, MAE), Eva (DINOv3, EVA-02) or VisionTransformerSAM (SAM) model"
    )


# timm modules whose models are one of the three families, and the keyword arguments that let them take
# any image size (a multiple of the patch): ``dynamic_img_size=True`` resamples absolute position
# embeddings / computes RoPE for the grid; SAM's encoder always resamples its position table.
_MODULE_SIZE_KWARGS: dict[str, dict[str, Any]] = {
    "vision_transformer": {"dynamic_img_size": True},
    "deit": {"dynamic_img_size": True},  # VisionTransformer subclasses (distillation token)
    "eva": {"dynamic_img_size": True},
    "vision_transformer_sam": {},
}


def size_kwargs(timm_name: str) -> dict[str, Any]:
    """The timm keyword arguments for any image size, for a timm model name (a pretrained tag is
    ignored); ``UserError`` for names of other model classes (ConvNeXt, NaFlexViT, Swin, ...)."""
    import timm.models

    base = timm_name.split(".")[0]
    try:
        module = timm.models.model_entrypoint(base).__module__.rsplit(".", 1)[-1]
    except (RuntimeError, KeyError) as e:
        raise UserError(f"unknown timm model '{timm_name}'") from e
    if module not in _MODULE_SIZE_KWARGS:
        raise UserError(
            f"'{timm_name}' is a timm '{module}' model, not a plain ViT this tool can split: use a "
            "VisionTransformer (DINOv2, CLIP, SigLIP, MAE), Eva (DINOv3, EVA-02) or SAM ViT name"
        )
    return dict(_MODULE_SIZE_KWARGS[module])
