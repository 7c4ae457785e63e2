"""Deformable convolution (DCNv1, Dai et al. 2017): a fast exact functional form and its module.

The convolution ViT-Split's :class:`~vitsplit.model.deform_block.DeformBlock` uses: 3x3, padding 1,
**no bias**, no modulation mask, one offset group. Semantics are exactly those of
``torchvision.ops.deform_conv2d``.

``deform_conv2d_fast`` computes the same thing as one ``grid_sample`` (bilinear sampling of every
kernel tap at its shifted position) followed by one matrix product with the weights, so that the
forward and backward run through PyTorch's vectorised kernels instead of torchvision's per-pixel
im2col loop. Why it is exact: torchvision's CPU/CUDA ``bilinear_interpolate``
(``torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp``) samples the input at absolute pixel
coordinates ``(y, x)``, returns 0 when ``y <= -1 or y >= H or x <= -1 or x >= W`` and otherwise
mixes the four neighbours with the ones outside the image taken as 0. That is plain bilinear
interpolation of the input padded with zeros, which is what ``grid_sample(..., mode="bilinear",
padding_mode="zeros", align_corners=False)`` computes after mapping a pixel coordinate ``x`` to
the normalised ``(2x + 1) / W - 1``. The two agree everywhere except on a set of measure zero
(sub-gradients exactly on integer coordinates), which random offsets never hit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATIONS = ("fast", "torchvision")


def _kernel_grid(
    offset: torch.Tensor, height: int, width: int, kh: int, kw: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Normalised sampling grid for every kernel tap.

    offset: (B, 2*kh*kw, Ho, Wo), channel 2k = y offset, 2k+1 = x offset of tap k = i*kw + j
    (torchvision's layout for one offset group). Returns (B, kh*kw*Ho, Wo, 2) as (x, y) in
    ``grid_sample``'s align_corners=False convention.
    """
    b, _, ho, wo = offset.shape
    dt, dev = offset.dtype, offset.device
    ki = torch.arange(kh, dtype=dt, device=dev).repeat_interleave(kw) * dilation  # (K,)
    kj = torch.arange(kw, dtype=dt, device=dev).repeat(kh) * dilation
    oy = torch.arange(ho, dtype=dt, device=dev) * stride - padding  # (Ho,)
    ox = torch.arange(wo, dtype=dt, device=dev) * stride - padding
    off = offset.reshape(b, kh * kw, 2, ho, wo)
    y = off[:, :, 0] + (ki.view(-1, 1, 1) + oy.view(1, -1, 1))  # (B, K, Ho, Wo) pixel rows
    x = off[:, :, 1] + (kj.view(-1, 1, 1) + ox.view(1, 1, -1))
    gx = (2.0 * x + 1.0) / width - 1.0
    gy = (2.0 * y + 1.0) / height - 1.0
    return torch.stack((gx, gy), dim=-1).reshape(b, kh * kw * ho, wo, 2)


def deform_conv2d_fast(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, *, stride: int = 1, padding: int = 0, dilation: int = 1
) -> torch.Tensor:
    """DCNv1 deformable convolution, equal to ``torchvision.ops.deform_conv2d(x, offset, weight,
    stride=stride, padding=padding, dilation=dilation)`` with one offset group, no bias, no mask.

    x: (B, Cin, H, W); offset: (B, 2*kh*kw, Ho, Wo); weight: (Cout, Cin, kh, kw).
    Returns (B, Cout, Ho, Wo). Differentiable in all three inputs.
    """
    b, cin, h, w = x.shape
    cout, cin_w, kh, kw = weight.shape
    if cin_w != cin or offset.shape[1] != 2 * kh * kw:
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, offset {tuple(offset.shape)}, weight {tuple(weight.shape)}"
        )
    ho, wo = offset.shape[-2:]
    grid = _kernel_grid(offset.to(x.dtype), h, w, kh, kw, stride, padding, dilation)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cols = cols.reshape(b, cin * kh * kw, ho * wo)  # (B, Cin*K, Ho*Wo), channel-major like weight
    out = torch.matmul(weight.reshape(cout, cin * kh * kw), cols)  # (B, Cout, Ho*Wo)
    return out.view(b, cout, ho, wo)


class DeformConv3x3(nn.Module):
    """3x3 deformable conv, padding 1, no bias (the release's ``DeformConv2d(C, C, 3, 1, 1)``).

    ``impl="fast"`` uses :func:`deform_conv2d_fast`; ``impl="torchvision"`` uses
    ``torchvision.ops.deform_conv2d`` (the reference). Parameter layout matches
    ``torchvision.ops.DeformConv2d`` (``weight`` of shape (Cout, Cin, 3, 3)) and its init.
    """

    def __init__(self, in_channels: int, out_channels: int, *, impl: str = "fast"):
        super().__init__()
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, not {impl!r}")
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # as torchvision.ops.DeformConv2d

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, H, W), offset: (B, 18, H, W) -> (B, Cout, H, W)."""
        if self.impl == "torchvision":
            from torchvision.ops import deform_conv2d  # noqa: PLC0415 - torchvision takes seconds to import; the reference only

            return deform_conv2d(x, offset, self.weight, padding=(1, 1))
        return deform_conv2d_fast(x, offset, self.weight, padding=1)


def set_deform_impl(module: nn.Module, impl: str) -> None:
    """Switch every :class:`DeformConv3x3` inside ``module`` to ``impl`` ("fast" or "torchvision")."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, not {impl!r}")
    for m in module.modules():
        if isinstance(m, DeformConv3x3):
            m.impl = impl
