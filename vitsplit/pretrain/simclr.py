"""Contrastive pretraining of demo-vit with crops and colour changes: SimCLR (Chen et al., "A Simple
Framework for Contrastive Learning of Visual Representations", ICML 2020).

Each image of a batch gives two views (:mod:`vitsplit.pretrain.views`: a random crop of 25-100 % of
its area resized to ``view_size``, a flip, a colour change); the backbone's final-normed class token
goes through a projection MLP (C -> hidden -> GELU -> out) and is L2-normalised; the loss is
NT-Xent: for each of the 2B views, cross-entropy of picking its partner among the other 2B - 1 views
by cosine similarity / temperature (SimCLR eq. 1, averaged over all 2B anchors).

Why it gives demo-vit a layer hierarchy where MAE did not (measured, see README): the two views of an
image share no pixel colour and only part of their content, so the class token must come from what
survives cropping and recolouring (texture, shape, layout), which is not a linear function of the
pixels; every block keeps writing a large update that re-orders which images look alike, and block
0's patch tokens (still near the pixels) end up far from the last block's in CKA.

``forward`` returns ``(loss, baseline)`` as :class:`vitsplit.pretrain.mae.MaskedAutoencoder` does;
the baseline is log(2B - 1), the loss when every view is equally similar to every other (chance).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from .views import colour_change, resized_crops


class SimCLR(nn.Module):
    """``SimCLR(backbone, view_size=56, crop_scale=(0.25, 1.0), temperature=0.2, proj_hidden=512,
    proj_dim=128)``; ``forward(images (B, 3, S, S) normalised, generator) -> (loss, baseline)``."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        view_size: int,
        crop_scale: tuple[float, float],
        temperature: float,
        proj_hidden: int,
        proj_dim: int,
    ):
        super().__init__()
        self.backbone = backbone
        self.view_size = view_size
        self.crop_scale = crop_scale
        self.temperature = temperature
        self.projection = nn.Sequential(
            nn.Linear(backbone.embed_dim, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, proj_dim)
        )

    def embed_views(self, views: torch.Tensor) -> torch.Tensor:
        """(N, 3, v, v) views -> (N, proj_dim) unit vectors (final-normed class token, projected)."""
        cls = self.backbone(views)[:, 0]
        return F.normalize(self.projection(cls), dim=-1)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if generator is None:
            generator = torch.default_generator
        b = images.shape[0]
        views = [
            colour_change(resized_crops(images, self.view_size, self.crop_scale, generator), generator)
            for _ in range(2)
        ]
        z = self.embed_views(torch.cat(views))  # (2B, D): views 0..B-1, then their partners
        sim = z @ z.T / self.temperature
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=sim.device), float("-inf"))
        partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(sim.device)
        loss = F.cross_entropy(sim, partner)
        return loss, torch.tensor(math.log(2 * b - 1))
