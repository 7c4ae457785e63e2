"""The :class:`Backbone` wrapper: a timm ViT of any supported family with per-block access, and its identity.

A :class:`Backbone` gives the toolkit one view of every family (:mod:`.families`: timm's
``VisionTransformer`` -- DINOv2, CLIP, SigLIP, MAE --, ``Eva`` -- DINOv3, EVA-02 -- and
``VisionTransformerSAM``): the token sequence after any block (``forward_layers``), the call of one
block or of a copy of it (``call_block``, with the grid's :class:`~.families.BlockContext`), the
frozen final norm, the patch size (14 or 16), the prefix tokens (class token, registers, or none),
and ``weights_source``, a string saying exactly where the weights came from ("random", a file path
with its sha256, or a hub id). :func:`state_hash` identifies its weights.

Images arrive normalised the data pipeline's way (ImageNet mean/std, :mod:`vitsplit.ops.imagenet`);
a model trained with other statistics (CLIP, SigLIP, EVA-02: timm's pretrained config says which)
gets them re-normalised exactly, by a per-channel affine map, before its patch embedding. Images
are centre-padded to a multiple of the patch size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..ops.imagenet import IMAGENET_MEAN, IMAGENET_STD
from .families import BlockContext, Family, ViTFamily, family_of


def pixel_stats(vit: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model was trained with: timm's pretrained config of the model (set for
    named models whether or not weights were loaded), else the ImageNet statistics."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class Backbone(nn.Module):
    """A ViT with per-block access.

    Attributes: ``vit`` (the timm model), ``family`` (:class:`~.families.Family`), ``num_layers``
    (blocks, L), ``embed_dim`` (C), ``patch_size`` (p), ``num_prefix_tokens`` (class token +
    registers), ``has_class_token``, ``num_registers``, ``pixel_mean``/``pixel_std`` (the model's
    normalisation), ``weights_source`` (str), ``name``.
    """

    def __init__(self, vit: nn.Module, *, name: str, weights_source: str):
        super().__init__()
        self.family: Family = family_of(vit)
        self.vit = vit
        self.name = name
        self.weights_source = weights_source
        self.num_layers = len(self.family.blocks(vit))
        self.embed_dim = int(vit.embed_dim)
        self.patch_size = self.family.patch_size(vit)
        self.num_prefix_tokens = self.family.num_prefix_tokens(vit)
        self.has_class_token = self.family.has_class_token(vit)
        self.num_registers = self.num_prefix_tokens - int(self.has_class_token)
        mean, std = pixel_stats(vit)
        self.pixel_mean, self.pixel_std = mean, std
        # x_model = (x * s_in + m_in - m) / s = x * (s_in / s) + (m_in - m) / s, per channel
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        self._renormalize = (mean, std) != (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))  # python floats: meta-safe

    # ----------------------------------------------------------------------------------- geometry
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an image of ``height x width`` after padding to a multiple of p."""
        p = self.patch_size
        return math.ceil(height / p), math.ceil(width / p)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Centre-pad ``x`` (B, 3, H, W) with zeros (the mean colour) to a multiple of the patch
        size, as DINOv2's ``CenterPadding`` does (the extra pixel goes right/bottom). Returns
        (B, 3, H', W')."""
        p = self.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if ph == 0 and pw == 0:
            return x
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (B, 3, H, W) -> the model's normalisation, centre-padded to a
        multiple of p: (B, 3, H', W')."""
        if self._renormalize:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        return self.pad(x)

    # ------------------------------------------------------------------------------------ forward
    def embed_with_context(self, x: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
        """Normalised images (B, 3, H, W) -> (token sequence before block 0 (B, T, C), the context
        every block call needs), T = num_prefix_tokens + h*w."""
        return self.family.embed(self.vit, self.to_model_input(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> token sequence before block 0, (B, T, C)."""
        return self.embed_with_context(x)[0]

    def block_context(self, hw: tuple[int, int]) -> BlockContext:
        """The context of an (h, w) patch grid: what the blocks got in a forward pass on that grid
        (the RoPE embedding for Eva models, the grid for SAM). Task-head copies run with it."""
        return self.family.context(self.vit, hw)

    def call_block(self, block: nn.Module, tokens: torch.Tensor, ctx: BlockContext, index: int) -> torch.Tensor:
        """Run ``block`` (one of this backbone's blocks or a copy of block ``index``) on tokens
        (B, T, C) -> (B, T, C), the way this family calls its blocks."""
        return self.family.call_block(block, tokens, ctx, index)

    def forward_layers(self, x: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Token sequences after each listed block.

        x: (B, 3, H, W) normalised images (any H, W; padded to a multiple of p).
        Returns {layer: (B, T, C)} with T = num_prefix_tokens + h*w (prefix tokens first, patch
        tokens row-major), taken after the block and before the final norm. Blocks deeper than
        the deepest listed layer are not run.
        """
        wanted = sorted(set(int(i) for i in layers))
        for i in wanted:
            if not 0 <= i < self.num_layers:
                raise UserError(f"layer {i} is outside [0, {self.num_layers - 1}] for {self.name}")
        out: dict[int, torch.Tensor] = {}
        if not wanted:
            return out
        h, ctx = self.embed_with_context(x)
        blocks = self.family.blocks(self.vit)
        for i in range(wanted[-1] + 1):
            h = self.family.call_block(blocks[i], h, ctx, i)
            if i in wanted:
                out[i] = h
        return out

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int, ctx: BlockContext | None = None) -> torch.Tensor:
        """Run blocks ``start .. stop-1`` on a token sequence (B, T, C) -> (B, T, C). ``ctx`` (from
        :meth:`embed_with_context` or :meth:`block_context`) is needed by RoPE and SAM models; a
        plain ViT's blocks also run on a subset of the tokens (MAE-style masking) without it."""
        if ctx is None:
            if not isinstance(self.family, ViTFamily):
                raise UserError(f"{self.name}'s blocks need the patch grid's context; pass ctx=block_context((h, w))")
            ctx = BlockContext(grid=(0, 0))
        blocks = self.family.blocks(self.vit)
        for i in range(start, stop):
            tokens = self.family.call_block(blocks[i], tokens, ctx, i)
        return tokens

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's frozen final norm on (B, T, C) -> (B, T, C) (identity for SAM, whose
        encoder ends in a convolutional neck instead)."""
        return self.family.final_norm(self.vit)(tokens)

    def tokens_to_map(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Drop prefix tokens and reshape patch tokens: (B, T, C) -> (B, C, h, w)."""
        b, _, c = tokens.shape
        patches = tokens[:, self.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(b, c, hw[0], hw[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> final-normed token sequence (B, T, C)."""
        return self.final_norm(self.forward_layers(x, [self.num_layers - 1])[self.num_layers - 1])


def tensors_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names, shapes, dtypes, bytes), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_hash(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes, dtypes, bytes), in key order."""
    return tensors_hash(module.state_dict())


def backbone_config(bb: Backbone, *, state_sha256: str | None = None) -> dict[str, Any]:
    """What a run records about its backbone (JSON-ready). ``state_sha256`` (default: :func:`state_hash`
    of ``bb`` now) identifies the weights the model was built on."""
    return {
        "name": bb.name,
        "weights_source": bb.weights_source,
        "num_layers": bb.num_layers,
        "embed_dim": bb.embed_dim,
        "patch_size": bb.patch_size,
        "num_prefix_tokens": bb.num_prefix_tokens,
        "family": bb.family.name,
        "has_class_token": bb.has_class_token,
        "num_registers": bb.num_registers,
        "state_sha256": state_sha256 if state_sha256 is not None else state_hash(bb),
    }
