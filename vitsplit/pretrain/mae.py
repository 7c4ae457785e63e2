"""The masked autoencoder around demo-vit (He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022; reference code facebookresearch/mae ``models_mae.py``).

75% of the patches of each image are dropped at random; the encoder (the demo-vit itself, with its
final norm) sees only the cls token and the visible patches; a light transformer decoder puts mask
tokens back in place and predicts the pixels of every patch; the loss is the mean squared error on
the masked patches only, against targets normalised per patch (``norm_pix_loss``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import Backbone
from ..errors import UserError


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (as MAE's decoder): (h*w, dim); half the channels
    encode the row, half the column, each as sin/cos of geometric frequencies (Vaswani et al. 2017)."""
    if dim % 4:
        raise UserError(f"decoder_dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * omega[None, :]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) with H, W multiples of p -> (B, N, p*p*3), patches in row-major order (the order
    of the ViT's patch tokens), pixels within a patch as (row, col, channel)."""
    b, c, hh, ww = images.shape
    x = images.reshape(b, c, hh // p, p, ww // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (hh // p) * (ww // p), p * p * c)


class MaskedAutoencoder(nn.Module):
    """MAE around a :class:`Backbone` (the encoder) with a light decoder (He et al. 2022).

    ``forward(images, generator)`` takes normalised images (B, 3, H, W) and returns
    ``(loss, baseline)``: the per-patch-normalised pixel MSE on the masked patches, and the same
    MSE for a prediction of zero.
    """

    def __init__(
        self,
        backbone: Backbone,
        grid: tuple[int, int],
        *,
        mask_ratio: float,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block  # noqa: PLC0415 - timm takes seconds to import

        self.backbone = backbone
        self.grid = grid
        self.mask_ratio = mask_ratio
        p = backbone.patch_size
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed_2d(decoder_dim, *grid)])
        self.register_buffer("decoder_pos", pos[None], persistent=False)  # (1, 1 + N, D_dec)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * 3)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.backbone
        tokens = bb.embed(images)  # (B, 1 + N, C), position embeddings added
        npre = bb.num_prefix_tokens
        prefix, patches = tokens[:, :npre], tokens[:, npre:]
        b, n, c = patches.shape
        if n != self.grid[0] * self.grid[1]:
            raise UserError(f"images give {n} patches, the pretraining grid has {self.grid[0] * self.grid[1]}")
        keep = max(1, int(round(n * (1 - self.mask_ratio))))
        noise = torch.rand(b, n, generator=generator, device=images.device)
        ids_keep = noise.argsort(dim=1)[:, :keep]  # (B, keep)
        visible = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, c))
        h = bb.final_norm(bb.run_blocks(torch.cat([prefix, visible], 1), 0, bb.num_layers))

        z = self.decoder_embed(h)  # (B, npre + keep, D)
        d = z.shape[-1]
        full = self.mask_token.expand(b, n, d).clone()
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, d), z[:, npre:])
        z = torch.cat([z[:, :1], full], 1) + self.decoder_pos  # cls + N patches (registers dropped)
        for blk in self.decoder_blocks:
            z = blk(z)
        pred = self.decoder_pred(self.decoder_norm(z))[:, 1:]  # (B, N, p*p*3)

        target = patchify(bb.pad(images), bb.patch_size)
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        masked = torch.ones(b, n, device=images.device).scatter(1, ids_keep, 0.0)  # 1 = masked
        per_patch = (pred - target).pow(2).mean(-1)
        loss = (per_patch * masked).sum() / masked.sum()
        baseline = (target.pow(2).mean(-1) * masked).sum() / masked.sum()
        return loss, baseline.detach()
