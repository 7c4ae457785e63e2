"""The fast deformable conv equals torchvision.ops.deform_conv2d (the oracle), values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from vitsplit.model.deform_block import DeformBlock
from vitsplit.ops.deform_conv import DeformConv3x3, deform_conv2d_fast, set_deform_impl


def _both(x, off, w, **kw):
    tv_kw = {k: (v, v) for k, v in kw.items()}
    a = deform_conv2d(x, off, w, **tv_kw)
    b = deform_conv2d_fast(x, off, w, **kw)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, (x, off, w), g)
    gb = torch.autograd.grad(b, (x, off, w), g)
    return a, b, ga, gb


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])  # small, large, and mostly out-of-bounds offsets
@pytest.mark.parametrize(
    "kw", [dict(padding=1), dict(padding=0), dict(padding=2, dilation=2), dict(padding=1, stride=2)]
)
def test_fast_equals_torchvision_float64(scale, kw):
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    s, p, d = kw.get("stride", 1), kw["padding"], kw.get("dilation", 1)
    ho, wo = (9 + 2 * p - d * 2 - 1) // s + 1, (11 + 2 * p - d * 2 - 1) // s + 1
    off = (torch.randn(2, 18, ho, wo, dtype=torch.float64) * scale).requires_grad_()
    a, b, ga, gb = _both(x, off, w, **kw)
    assert a.shape == b.shape == (2, 4, ho, wo)
    assert a.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    for name, p_, q in zip(("input", "offset", "weight"), ga, gb):
        torch.testing.assert_close(q, p_, rtol=0, atol=1e-10, msg=f"grad {name}")


def test_fast_equals_torchvision_float32_border_offsets():
    # Offsets that land every sample in the border band (-1, 0) / (H-1, H) and beyond, where
    # torchvision interpolates partially with zeros outside and returns 0 past -1 / H.
    x = torch.randn(1, 3, 6, 7, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, requires_grad=True)
    off = torch.empty(1, 18, 6, 7).uniform_(-8.0, 8.0)
    off[:, :, 0] = -0.5 - torch.rand(1, 18, 7) * 0.9  # row 0 taps pushed to y in (-2.4, 0)
    off = off.requires_grad_()
    a, b, ga, gb = _both(x, off, w, padding=1)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for p_, q in zip(ga, gb):
        torch.testing.assert_close(q, p_, rtol=1e-5, atol=1e-5)


def test_zero_offsets_is_plain_conv():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    off = torch.zeros(2, 18, 8, 8)
    torch.testing.assert_close(
        deform_conv2d_fast(x, off, w, padding=1), F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5
    )


def test_integer_offset_shifts_sampling():
    # A whole-pixel x offset of +1 on every tap: output column j reads columns j..j+2 (zeros past
    # the right edge), i.e. a plain conv with no left padding and two columns of right padding.
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(3, 2, 3, 3)
    off = torch.zeros(1, 18, 6, 6)
    off[:, 1::2] = 1.0
    expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), w)
    torch.testing.assert_close(deform_conv2d_fast(x, off, w, padding=1), expected, rtol=1e-5, atol=1e-5)


def test_block_impls_agree_and_switch():
    torch.manual_seed(1)
    blk = DeformBlock(8, 8)
    assert sum(p.numel() for p in blk.parameters()) == 8 * 18 * 9 + 18 + 8 * 8 * 9  # no deform bias
    torch.nn.init.normal_(blk.offset.weight, std=0.5)  # non-trivial offsets
    x = torch.randn(2, 8, 7, 7)
    fast = blk(x)
    set_deform_impl(blk, "torchvision")
    assert blk.conv.impl == "torchvision"
    torch.testing.assert_close(fast, blk(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        DeformConv3x3(4, 4, impl="cuda-magic")
