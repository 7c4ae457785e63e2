"""demo-vit's own pretraining (MAE); it depends on :mod:`vitsplit.backbones`, never the reverse."""

from .loop import PretrainResult, load_or_pretrain_demo_vit, pretrain, pretrain_demo_vit, render_images
from .mae import MaskedAutoencoder, patchify, sincos_pos_embed_2d

__all__ = ["MaskedAutoencoder", "PretrainResult", "load_or_pretrain_demo_vit", "patchify", "pretrain",
           "pretrain_demo_vit", "render_images", "sincos_pos_embed_2d"]
