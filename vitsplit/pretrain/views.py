"""Random views of a batch of images for contrastive pretraining: resized crops with flips, and colour
changes (SimCLR's augmentations, Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, sec. 3 and appendix A).

Every random number comes from the caller's ``torch.Generator`` (on the CPU), so the views are a pure
function of the images and the generator's state, on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Colour change in ImageNet-normalised units (one unit ~ 0.23 of the 8-bit range): a gain and an
# offset per channel, then grey with this probability (SimCLR: colour jitter strength 1.0, grey 0.2).
GAIN_RANGE = (0.6, 1.4)
OFFSET_RANGE = (-0.4, 0.4)
GREY_PROBABILITY = 0.2


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.empty(n, *shape).uniform_(lo, hi, generator=generator)


def resized_crops(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """One random square crop per image, resized to ``size`` (bilinear) and flipped left-right with
    probability 0.5.

    images: (B, 3, S, S); the crop's area is a uniform fraction of the image's in ``scale`` and it lies
    inside the image. Returns (B, 3, size, size).
    """
    b, _, s, _ = images.shape
    area = _uniform(b, scale[0], scale[1], generator)
    side = area.sqrt() * s  # crop side in pixels
    cx = torch.rand(b, generator=generator) * (s - side) + side / 2
    cy = torch.rand(b, generator=generator) * (s - side) + side / 2
    flip = (torch.rand(b, generator=generator) < 0.5).float() * 2 - 1
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = side / s * flip  # output [-1, 1] -> crop, mirrored or not
    theta[:, 1, 1] = side / s
    theta[:, 0, 2] = cx / s * 2 - 1
    theta[:, 1, 2] = cy / s * 2 - 1
    grid = F.affine_grid(theta.to(images.device, images.dtype), [b, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_change(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random permutation of the colour channels, a gain and an offset per channel
    (``GAIN_RANGE``, ``OFFSET_RANGE``), then grey (the channel mean) with ``GREY_PROBABILITY``.

    images: (B, 3, H, W) normalised -> (B, 3, H, W). The scenes' colours are random per object, so
    colour identifies nothing; changing it makes the views agree on texture, shape and layout.
    """
    b = images.shape[0]
    dev = images.device
    perm = torch.stack([torch.randperm(3, generator=generator) for _ in range(b)]).to(dev)
    x = torch.gather(images, 1, perm[:, :, None, None].expand_as(images))
    gain = _uniform(b, *GAIN_RANGE, generator, 3, 1, 1).to(dev)
    offset = _uniform(b, *OFFSET_RANGE, generator, 3, 1, 1).to(dev)
    x = x * gain + offset
    grey = (torch.rand(b, 1, 1, 1, generator=generator) < GREY_PROBABILITY).float().to(dev)
    return grey * x.mean(1, keepdim=True).expand_as(x) + (1 - grey) * x
