"""The :class:`Backbone` wrapper: a timm ``VisionTransformer`` with per-block access, and its identity.

A :class:`Backbone` exposes what the rest of the toolkit needs: the token sequence after any block
(``forward_layers``), the frozen final norm, the patch size and the number of prefix (cls +
register) tokens, and ``weights_source``, a string saying exactly where the weights came from
("random", a file path with its sha256, or a hub id). :func:`state_hash` identifies its weights.
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


class Backbone(nn.Module):
    """A ViT with per-block access.

    Attributes: ``vit`` (the timm ``VisionTransformer``), ``num_layers`` (blocks, L),
    ``embed_dim`` (C), ``patch_size`` (p), ``num_prefix_tokens`` (cls + registers),
    ``weights_source`` (str), ``name``.
    """

    def __init__(self, vit: nn.Module, *, name: str, weights_source: str):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer  # noqa: PLC0415 - timm takes seconds to import

        if not isinstance(vit, VisionTransformer):
            raise UserError(f"model '{name}' is not a timm VisionTransformer; only plain ViTs have the layer structure this tool splits")
        self.vit = vit
        self.name = name
        self.weights_source = weights_source
        self.num_layers = len(vit.blocks)
        self.embed_dim = vit.embed_dim
        ps = vit.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------------- geometry
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an image of ``height x width`` after padding to a multiple of p."""
        p = self.patch_size
        return math.ceil(height / p), math.ceil(width / p)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Centre-pad ``x`` (B, 3, H, W) with zeros to a multiple of the patch size, as DINOv2's
        ``CenterPadding`` does (the extra pixel goes right/bottom). Returns (B, 3, H', W')."""
        p = self.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if ph == 0 and pw == 0:
            return x
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised."""
        return (x - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> token sequence before block 0, (B, T, C), where
        T = num_prefix_tokens + h*w. Pads to a multiple of the patch size first."""
        vit = self.vit
        x = vit.patch_embed(self.pad(x))
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_layers(self, x: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Token sequences after each listed block.

        x: (B, 3, H, W) normalised images (any H, W; padded to a multiple of p).
        Returns {layer: (B, T, C)} with T = num_prefix_tokens + h*w (prefix tokens first), taken
        after the block and before the final norm. Blocks deeper than the deepest listed layer are
        not run.
        """
        wanted = sorted(set(int(i) for i in layers))
        for i in wanted:
            if not 0 <= i < self.num_layers:
                raise UserError(f"layer {i} is outside [0, {self.num_layers - 1}] for {self.name}")
        out: dict[int, torch.Tensor] = {}
        if not wanted:
            return out
        h = self.embed(x)
        for i in range(wanted[-1] + 1):
            h = self.vit.blocks[i](h)
            if i in wanted:
                out[i] = h
        return out

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start .. stop-1`` on a token sequence (B, T, C) -> (B, T, C)."""
        for i in range(start, stop):
            tokens = self.vit.blocks[i](tokens)
        return tokens

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's final LayerNorm on (B, T, C) -> (B, T, C)."""
        return self.vit.norm(tokens)

    def tokens_to_map(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Drop prefix tokens and reshape patch tokens: (B, T, C) -> (B, C, h, w)."""
        b, _, c = tokens.shape
        patches = tokens[:, self.num_prefix_tokens:]
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
        "state_sha256": state_sha256 if state_sha256 is not None else state_hash(bb),
    }
