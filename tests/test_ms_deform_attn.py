"""Multi-scale deformable attention (vitsplit.ops.ms_deform_attn) against the formula written out.

The reference reads every sampling point's four neighbours by explicit index arithmetic and
``gather`` (no grid_sample), with the CUDA kernel's rules: pixel coordinates ``loc * size - 0.5``,
neighbours outside the map are 0. Values and gradients (value, locations, weights) must agree:
float64 to 1e-10, float32 to float32 precision.
"""

import math

import pytest
import torch

from vitsplit.ops.ms_deform_attn import MSDeformAttn, level_start_index, ms_deform_attn, reference_points

SHAPES = [(6, 7), (3, 4), (2, 1)]


def reference(value, shapes, loc, attw):
    """value (B, S, M, D), loc (B, Q, M, L, P, 2) as (x, y) in [0, 1], attw (B, Q, M, L, P) -> (B, Q, M*D)."""
    b, s, m, d = value.shape
    q, p = loc.shape[1], loc.shape[4]
    out = torch.zeros(b, q, m, d, dtype=value.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w]  # (B, HW, M, D)
        start += h * w
        x = loc[:, :, :, lvl, :, 0] * w - 0.5  # (B, Q, M, P) pixel coordinates
        y = loc[:, :, :, lvl, :, 1] * h - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        fx, fy = x - x0, y - y0
        x0, y0 = x0.long(), y0.long()
        corners = [
            (y0, x0, (1 - fy) * (1 - fx)),
            (y0, x0 + 1, (1 - fy) * fx),
            (y0 + 1, x0, fy * (1 - fx)),
            (y0 + 1, x0 + 1, fy * fx),
        ]
        for yi, xi, wt in corners:
            inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            flat = yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)  # (B, Q, M, P)
            # gather v[b, flat[b, q, m, p], m, :]
            idx = flat.permute(0, 2, 1, 3).reshape(b, m, q * p)  # (B, M, Q*P)
            vv = v.permute(0, 2, 1, 3)  # (B, M, HW, D)
            got = torch.gather(vv, 2, idx[..., None].expand(-1, -1, -1, d)).view(b, m, q, p, d).permute(0, 2, 1, 3, 4)
            coef = (wt * inside.to(value.dtype) * attw[:, :, :, lvl, :])[..., None]  # (B, Q, M, P, 1)
            out = out + (coef * got).sum(dim=3)
    return out.reshape(b, q, m * d)


def inputs(dtype, b=2, q=5, m=3, d=4, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, m, d, generator=g, dtype=dtype)
    # locations from -0.3 to 1.3: inside, on the border band (partly outside) and fully outside
    loc = torch.rand(b, q, m, len(SHAPES), p, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    attw = torch.rand(b, q, m, len(SHAPES), p, generator=g, dtype=dtype)
    return value, loc, attw


def grads(fn, value, loc, attw, seed=1):
    value, loc, attw = (t.detach().clone().requires_grad_(True) for t in (value, loc, attw))
    out = fn(value, SHAPES, loc, attw)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), value.grad, loc.grad, attw.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_reference_formula_values_and_gradients(dtype, tol):
    value, loc, attw = inputs(dtype)
    ours = grads(ms_deform_attn, value, loc, attw)
    ref = grads(reference, value, loc, attw)
    for name, a, r in zip(("output", "d value", "d locations", "d weights"), ours, ref):
        assert a.shape == r.shape, name
        scale = max(1.0, float(r.abs().max()))
        assert float((a - r).abs().max()) <= tol * scale, (name, float((a - r).abs().max()))
    # the test exercises real content: the output and every gradient are non-zero, and some
    # locations fall fully outside a map (those read zeros)
    assert all(float(t.abs().max()) > 1e-3 for t in ref)
    x = loc[..., 0] * torch.tensor([w for _, w in SHAPES], dtype=dtype).view(1, 1, 1, -1, 1) - 0.5
    assert bool((x <= -1).any()) and bool(((x > -1) & (x < 0)).any())


def test_gradcheck_float64():
    value, loc, attw = inputs(torch.float64, b=1, q=2, m=2, d=2, p=2, seed=3)
    fn = lambda v, l, a: ms_deform_attn(v, SHAPES, l, a)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, (value.requires_grad_(), loc.requires_grad_(), attw.requires_grad_()), eps=1e-6, atol=1e-7
    )


def test_known_values_on_one_pixel_grid():
    """A 2x2 map, one head, one point: the centre of pixel (0, 1) reads exactly that pixel; the
    point midway between all four pixels reads their mean; a point half a pixel outside the left
    edge at a pixel-centre row reads half of that row's left pixel (zero padding)."""
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).reshape(1, 4, 1, 1)
    loc = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.0, 0.75]], dtype=torch.float64).view(1, 3, 1, 1, 1, 2)
    out = ms_deform_attn(v, [(2, 2)], loc, torch.ones(1, 3, 1, 1, 1, dtype=torch.float64))
    assert out.flatten().tolist() == [2.0, 2.5, 1.5]


def test_input_checks_name_the_shapes():
    value, loc, attw = inputs(torch.float32)
    with pytest.raises(ValueError, match=r"\(6, 7\).*S = 55"):
        ms_deform_attn(value[:, :-1], SHAPES, loc, attw)
    with pytest.raises(ValueError, match=r"sampling_locations.*\(2, 5, 3, 2, 4, 2\)"):
        ms_deform_attn(value, SHAPES, loc[:, :, :, :2], attw)
    with pytest.raises(ValueError, match=r"attention_weights.*\(2, 5, 3, 3, 3\)"):
        ms_deform_attn(value, SHAPES, loc, attw[..., :3])
    with pytest.raises(ValueError, match=r"value must be"):
        ms_deform_attn(value[0], SHAPES, loc, attw)
    attn = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=2)
    with pytest.raises(ValueError, match="levels"):
        attn(torch.randn(1, 4, 8), torch.rand(1, 4, 1, 2), torch.randn(1, 54, 8), SHAPES[:2])
    with pytest.raises(ValueError, match="reference_points"):
        attn(torch.randn(1, 4, 8), torch.rand(1, 5, 1, 2), torch.randn(1, 56, 8), SHAPES)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_levels=1, n_heads=4, ratio=1.0)


def test_module_equals_formula_with_its_own_layers():
    """The module = output_proj(ms_deform_attn(value_proj(x), ref + offsets / (W, H), softmax(weights)))."""
    torch.manual_seed(0)
    c, m, n_l, p = 12, 3, len(SHAPES), 2
    attn = MSDeformAttn(d_model=c, n_levels=n_l, n_heads=m, n_points=p, ratio=0.5).double()
    for lin in (attn.sampling_offsets, attn.attention_weights):  # move off the init so the check is not trivial
        torch.nn.init.normal_(lin.weight, std=0.3)
    s = sum(h * w for h, w in SHAPES)
    query, feat = torch.randn(2, 5, c, dtype=torch.float64), torch.randn(2, s, c, dtype=torch.float64)
    ref_pts = torch.rand(2, 5, n_l, 2, dtype=torch.float64)
    out = attn(query, ref_pts, feat, SHAPES)
    value = attn.value_proj(feat).view(2, s, m, c // 2 // m)
    off = attn.sampling_offsets(query).view(2, 5, m, n_l, p, 2)
    wts = attn.attention_weights(query).view(2, 5, m, n_l * p).softmax(-1).view(2, 5, m, n_l, p)
    wh = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)
    loc = ref_pts[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    expected = attn.output_proj(reference(value, SHAPES, loc, wts))
    assert out.shape == (2, 5, c)
    assert float((out - expected).detach().abs().max()) < 1e-10


def test_init_offsets_and_reference_points():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    # head 0 looks right (+x), head 1 down (+y), head 2 left, head 3 up; point k at distance k+1
    assert torch.allclose(bias[0, 1, 2], torch.tensor([3.0, 0.0]), atol=1e-6)
    assert torch.allclose(bias[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.allclose(bias[2, 0, 1], torch.tensor([-2.0, 0.0]), atol=1e-6)
    assert float(attn.attention_weights.weight.detach().abs().sum()) == 0.0
    pts = reference_points([(2, 4), (1, 1)])
    assert pts.shape == (1, 9, 1, 2)
    assert pts[0, 1, 0].tolist() == [0.375, 0.25] and pts[0, 8, 0].tolist() == [0.5, 0.5]
    assert level_start_index([(2, 4), (1, 1), (3, 3)]) == [0, 8, 9]
    assert math.isclose(float(pts[0, 4, 0, 1]), 0.75)
