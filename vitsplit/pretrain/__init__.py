"""demo-vit's own pretraining (SimCLR or MAE); it depends on :mod:`vitsplit.backbones`, never the reverse."""

from .loop import (
    PretrainResult,
    load_or_pretrain_demo_vit,
    pretext_model,
    pretrain,
    pretrain_demo_vit,
    pretrain_to_file,
    render_images,
)
from .mae import MaskedAutoencoder, patchify, sincos_pos_embed_2d
from .simclr import SimCLR

__all__ = [
    "MaskedAutoencoder",
    "PretrainResult",
    "SimCLR",
    "load_or_pretrain_demo_vit",
    "patchify",
    "pretext_model",
    "pretrain",
    "pretrain_demo_vit",
    "pretrain_to_file",
    "render_images",
    "sincos_pos_embed_2d",
]
