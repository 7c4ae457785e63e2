"""Tiny members of every backbone family the toolkit splits (width 64, 4 blocks, random weights).

Each is timm's own architecture for the family, shrunk: the same classes, prefix tokens, position
encoding, attention type and normalisation statistics as the real models.
"""

from __future__ import annotations

import timm
import torch

from vitsplit.backbones import Backbone

SMALL = dict(depth=4, embed_dim=64, num_heads=2, num_classes=0)

# family id -> (timm name, keyword arguments)
TINY = {
    "dinov2": ("vit_small_patch14_reg4_dinov2", dict(SMALL, img_size=56, dynamic_img_size=True)),
    "dinov3": ("vit_small_patch16_dinov3", dict(SMALL)),
    "dinov3_swiglu": ("vit_small_plus_patch16_dinov3", dict(SMALL)),
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", dict(SMALL)),
    "eva02": ("eva02_tiny_patch14_224", dict(SMALL, img_size=56, dynamic_img_size=True)),
    "clip": ("vit_base_patch16_clip_224.openai", dict(SMALL, img_size=64, dynamic_img_size=True)),
    "siglip": ("vit_base_patch16_siglip_224.v2_webli", dict(SMALL, img_size=64, dynamic_img_size=True)),
    "mae": ("vit_base_patch16_224.mae", dict(SMALL, img_size=64, dynamic_img_size=True)),
    "sam": ("samvit_base_patch16", dict(SMALL, img_size=64, window_size=2, global_attn_indexes=[1, 3])),
}


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter random; norm weights around 1 and layer scales around 0.3, so that every
    block changes the tokens measurably (the real models' 1e-5 layer-scale init would not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                p.copy_(0.3 + 0.05 * r)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + scale * r)
            else:
                p.copy_(scale * r)
    return module


def tiny_vit(family: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs = TINY[family]
    return randomize(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


def tiny_backbone(family: str, seed: int = 0) -> Backbone:
    return Backbone(tiny_vit(family, seed), name=f"tiny-{family}", weights_source="random").eval()


def plain_tiny_backbone() -> Backbone:
    """A plain timm VisionTransformer (patch 8, width 32, 4 blocks, seed 0) named "tiny": the training,
    sweep and resume tests' model."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    return Backbone(vit, name="tiny", weights_source="random (seed 0)").eval()
