"""The CKA estimator: agreement with ckatorch and with an explicit per-batch reference written from
the formulas, invariances, numerics on DINOv2-like float32 features, undefined values, state."""

import io
import math
import warnings

import pytest
import torch
from ckatorch import cka_base, cka_batch, hsic1

from cka_split import MinibatchCKA, linear_cka
from cka_split.estimator.cka import BatchTooSmallError, GramWorkspace, centered_gram
from vitsplit.errors import UserError

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def related(n: int, p: int, q: int, seed: int = 0, dtype=f64) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, p) and y (n, q) = a linear map of x plus noise: CKA clearly between 0 and 1."""
    g = gen(seed)
    x = torch.randn(n, p, generator=g, dtype=f64)
    y = x @ torch.randn(p, q, generator=g, dtype=f64) + 2.0 * torch.randn(n, q, generator=g, dtype=f64)
    return x.to(dtype), y.to(dtype)


# ------------------------------------------------------------------ reference, from the formulas
def hsic_biased_ref(k: torch.Tensor, l: torch.Tensor) -> float:
    """tr(K H L H) / (n-1)^2 (Gretton et al. 2005)."""
    n = k.shape[0]
    h = torch.eye(n, dtype=f64) - torch.ones(n, n, dtype=f64) / n
    return float(torch.trace(k @ h @ l @ h)) / (n - 1) ** 2


def hsic_unbiased_ref(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. 2012, Eq. 5, with K~, L~ the Grams with zero diagonals."""
    n = k.shape[0]
    kt, lt = k.clone(), l.clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=f64)
    term = (
        torch.trace(kt @ lt)
        + (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one.T @ kt @ lt @ one)
    )
    return float(term) / (n * (n - 3))


def minibatch_cka_ref(batches: list[list[torch.Tensor]], unbiased: bool) -> torch.Tensor:
    """A plain loop: for every pair (i, j) sum HSIC over minibatches, then normalise (Nguyen et al. 2021)."""
    hsic = hsic_unbiased_ref if unbiased else hsic_biased_ref
    nsets = len(batches[0])
    s = torch.zeros(nsets, nsets, dtype=f64)
    for feats in batches:
        grams = [f.to(f64).reshape(f.shape[0], -1) @ f.to(f64).reshape(f.shape[0], -1).T for f in feats]
        for i in range(nsets):
            for j in range(nsets):
                s[i, j] += hsic(grams[i], grams[j])
    out = torch.empty_like(s)
    for i in range(nsets):
        for j in range(nsets):
            out[i, j] = s[i, j] / math.sqrt(s[i, i] * s[j, j])
    return out


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_cka_agrees_with_ckatorch(unbiased, seed):
    x, y = related(40, 30, 20, seed)
    ours = linear_cka(x, y, unbiased=unbiased)
    ref = float(cka_base(x, y, unbiased=unbiased))
    assert 0.05 < ref < 0.95
    assert ours == pytest.approx(ref, abs=1e-12)


def test_biased_and_unbiased_differ_and_match_formula_references():
    x, y = related(30, 25, 10, seed=3)
    kx, ky = x @ x.T, y @ y.T
    b = hsic_biased_ref(kx, ky) / math.sqrt(hsic_biased_ref(kx, kx) * hsic_biased_ref(ky, ky))
    u = hsic_unbiased_ref(kx, ky) / math.sqrt(hsic_unbiased_ref(kx, kx) * hsic_unbiased_ref(ky, ky))
    assert linear_cka(x, y, unbiased=False) == pytest.approx(b, abs=1e-12)
    assert linear_cka(x, y, unbiased=True) == pytest.approx(u, abs=1e-12)
    assert abs(b - u) > 1e-3


@pytest.mark.parametrize("unbiased", [False, True])
def test_minibatch_equals_explicit_per_batch_reference(unbiased):
    g = gen(5)
    batches = []
    for _ in range(4):  # 4 minibatches of 12, three feature sets
        a = torch.randn(12, 3, 5, generator=g, dtype=f64)
        b = a.reshape(12, -1) @ torch.randn(15, 8, generator=g, dtype=f64) + torch.randn(12, 8, generator=g, dtype=f64)
        c = torch.randn(12, 6, generator=g, dtype=f64) + 0.5 * b[:, :6]
        batches.append([a, b, c])
    acc = MinibatchCKA(unbiased=unbiased)
    for feats in batches:
        acc.update(feats)
    ours = acc.compute()
    ref = minibatch_cka_ref(batches, unbiased)
    assert ours.dtype == f64 and ours.shape == (3, 3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # not the same as pooling every example into one batch
    pooled = MinibatchCKA(unbiased=unbiased)
    pooled.update([torch.cat([bt[i] for bt in batches]) for i in range(3)])
    assert (pooled.compute() - ours).abs().max() > 1e-4
    assert acc.num_batches == 4 and acc.num_examples == 48
    if unbiased:  # ckatorch's own minibatch CKA (hsic1 summed over minibatches) on pairs
        for i, j in [(0, 1), (1, 2), (0, 2)]:
            xb = torch.stack([bt[i].reshape(12, -1) for bt in batches])
            yb = torch.stack([bt[j].reshape(12, -1) for bt in batches])
            assert float(ours[i, j]) == pytest.approx(float(cka_batch(xb, yb)), abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(unbiased):
    x, y = related(50, 16, 12, seed=7)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(8), dtype=f64))
    base = linear_cka(x, y, unbiased)
    assert linear_cka(x @ q, y, unbiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 37.5 * y, unbiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(1e-3 * (x @ q), y + 5.0, unbiased) == pytest.approx(base, abs=1e-12)
    # an anisotropic scaling is not an invariance: the test above would notice a constant answer
    d = torch.ones(16, dtype=f64)
    d[:3] = 30.0
    assert abs(linear_cka(x * d, y, unbiased) - base) > 1e-3


@pytest.mark.parametrize("unbiased", [False, True])
def test_self_similarity_is_one(unbiased):
    x, _ = related(20, 64, 1, seed=9)
    assert linear_cka(x, x, unbiased) == pytest.approx(1.0, abs=1e-12)
    acc = MinibatchCKA(unbiased)
    acc.update([x, x.clone(), 3 * x])
    torch.testing.assert_close(acc.compute(), torch.ones(3, 3, dtype=f64), rtol=0, atol=1e-12)


def test_unbiased_cka_of_independent_features_is_near_zero_biased_is_not():
    g = gen(11)
    x = torch.randn(500, 1000, generator=g, dtype=f64)
    y = torch.randn(500, 1000, generator=g, dtype=f64)
    assert abs(linear_cka(x, y, unbiased=True)) < 0.01
    assert linear_cka(x, y, unbiased=False) > 0.5


def dinov2_like(n: int, seed: int, tokens: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n, tokens, 64) x and y: a shared per-(token, channel) mean of 1e3-2e3 and three channels
    100x larger than the rest (massive activations; different channels in x and y, one shared),
    y a noisy linear mix of x's fluctuations."""
    g = gen(seed)
    sx = torch.ones(64, dtype=f64)
    sx[[3, 17, 40]] = 100.0
    sy = torch.ones(64, dtype=f64)
    sy[[5, 17, 51]] = 100.0
    shared = 1e3 * (1 + torch.rand(tokens, 64, generator=g, dtype=f64))
    z = torch.randn(n, tokens, 64, generator=g, dtype=f64)
    mix = torch.randn(64, 64, generator=g, dtype=f64) / 4
    x = shared + sx * z
    y = shared.flip(0) + sy * (z @ mix + torch.randn(n, tokens, 64, generator=g, dtype=f64))
    return x.float(), y.float()


@pytest.mark.parametrize("unbiased", [False, True])
def test_float32_dinov2_like_features_match_float64_reference(unbiased):
    x32, y32 = dinov2_like(64, seed=12)
    xf, yf = x32.reshape(64, -1), y32.reshape(64, -1)
    ref = float(cka_base(xf.double(), yf.double(), unbiased=unbiased))
    ours = linear_cka(x32, y32, unbiased)
    assert 0.02 < ref < 0.9
    assert abs(ours - ref) < 1e-5
    # the usual float32 formulas on uncentred float32 Grams miss the 1e-5 bar (unbiased: NaN)
    kx, ky = xf @ xf.T, yf @ yf.T
    if unbiased:
        naive = float(hsic1(kx[None], ky[None]) / (hsic1(kx[None], kx[None]) * hsic1(ky[None], ky[None])).sqrt())
    else:
        h = torch.eye(64) - torch.ones(64, 64) / 64
        kxc, kyc = h @ kx @ h, h @ ky @ h
        naive = float((kxc * kyc).sum() / (kxc.norm() * kyc.norm()))
    assert not abs(naive - ref) < 2e-5
    # minibatches of float32 features against the float64 reference loop
    batches = [[x32[i : i + 16], y32[i : i + 16]] for i in range(0, 64, 16)]
    acc = MinibatchCKA(unbiased)
    for b in batches:
        acc.update(b)
    ref_mb = minibatch_cka_ref([[t.double() for t in b] for b in batches], unbiased)
    assert (acc.compute() - ref_mb).abs().max() < 1e-5


def test_blocked_gram_equals_plain_float64_gram(monkeypatch):
    import cka_split.estimator.cka as cka_module

    monkeypatch.setattr(cka_module, "GRAM_BLOCK_ELEMENTS", 1 << 12)
    x = 1e3 + torch.randn(5, 3 * (1 << 12) // 5 + 7, generator=gen(13))  # 4 column blocks
    x64 = x.double() - x.double().mean(0)
    ws = GramWorkspace()
    got = ws(x)
    n = x.shape[0]
    h = torch.eye(n, dtype=f64) - 1.0 / n
    ref = x64 @ x64.T
    assert (h @ got @ h - ref).abs().max() < 1e-9 * ref.abs().max()  # = mean-centred Gram once centred
    assert (got - ref).abs().max() > 1e-3 * ref.abs().max()  # (but it is the example-0 shift)
    assert torch.equal(got, centered_gram(x)) and torch.equal(ws(x[:, :9]), centered_gram(x[:, :9]))
    assert len(ws.buffers) == 1


def test_constant_feature_set_is_nan_with_warning_not_zero_or_one():
    x, y = related(10, 5, 5, seed=14)
    const = torch.full((10, 7), 1234.567, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(linear_cka(x, const, unbiased=True))
    acc = MinibatchCKA(unbiased=True)
    acc.update([x, const, y])
    with pytest.warns(RuntimeWarning, match=r"\[1\]"):
        m = acc.compute()
    assert torch.isnan(m[1]).all() and torch.isnan(m[:, 1]).all()
    assert not torch.isnan(m[[0, 2]][:, [0, 2]]).any()


def test_too_few_examples_is_a_clear_error():
    x = torch.randn(3, 4)
    with pytest.raises(BatchTooSmallError, match="at least 4 examples"):
        linear_cka(x, x, unbiased=True)
    assert issubclass(BatchTooSmallError, UserError) and issubclass(BatchTooSmallError, ValueError)
    assert linear_cka(x, x, unbiased=False) == pytest.approx(1.0, abs=1e-12)  # biased is defined at n = 3
    acc = MinibatchCKA()
    with pytest.raises(ValueError, match="same examples"):
        acc.update([torch.randn(5, 2), torch.randn(6, 2)])
    acc.update([torch.randn(5, 2), torch.randn(5, 2)])
    with pytest.raises(ValueError, match="2 feature sets"):
        acc.update([torch.randn(5, 2)] * 3)


def test_state_round_trip_resumes_exactly():
    g = gen(15)
    batches = [[torch.randn(8, 6, generator=g), torch.randn(8, 3, 4, generator=g)] for _ in range(4)]
    whole = MinibatchCKA()
    for b in batches:
        whole.update(b)
    first = MinibatchCKA()
    for b in batches[:2]:
        first.update(b)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = MinibatchCKA()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for b in batches[2:]:
        resumed.update(b)
    assert torch.equal(resumed.compute(), whole.compute())
    assert (resumed.num_batches, resumed.num_examples) == (4, 32)
    with pytest.raises(ValueError, match="unbiased"):
        MinibatchCKA(unbiased=False).load_state_dict(first.state_dict())


def test_all_reduce_without_a_process_group_is_a_no_op():
    acc = MinibatchCKA()
    acc.update([torch.randn(6, 3), torch.randn(6, 2)])
    before = acc.compute()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc.all_reduce()
    assert torch.equal(acc.compute(), before)


# ------------------------------------------------------------------------- jackknife SE
def loo_se_reference(batches: list[list[torch.Tensor]], unbiased: bool = True) -> torch.Tensor:
    """The jackknife written out: B separate accumulators, each leaving one minibatch out."""
    loo = []
    for b in range(len(batches)):
        acc = MinibatchCKA(unbiased=unbiased)
        for c, feats in enumerate(batches):
            if c != b:
                acc.update(feats)
        loo.append(acc.compute())
    loo = torch.stack(loo)
    n = len(batches)
    return torch.sqrt((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0))


@pytest.mark.parametrize("unbiased", [False, True])
def test_jackknife_se_equals_direct_leave_one_out(unbiased):
    g = gen(21)
    batches = []
    for _ in range(7):
        x = torch.randn(10, 12, generator=g, dtype=f64)
        batches.append(
            [
                x,
                x @ torch.randn(12, 5, generator=g, dtype=f64) + torch.randn(10, 5, generator=g, dtype=f64),
                torch.randn(10, 3, 2, generator=g, dtype=f64),
            ]
        )
    acc = MinibatchCKA(unbiased=unbiased)
    for b in batches:
        acc.update(b)
    se, ref = acc.compute_se(), loo_se_reference(batches, unbiased)
    assert se.shape == (3, 3) and se.dtype == f64
    torch.testing.assert_close(se, ref, rtol=0, atol=1e-10)
    assert float(se[0, 1]) > 1e-3 and float(se[0, 2]) > 1e-3  # non-trivial values were compared
    assert torch.all(torch.diagonal(se) < 1e-12)  # CKA(x, x) = 1 in every leave-one-out
    assert acc.batch_terms().shape == (7, 3, 3)
    torch.testing.assert_close(acc.batch_terms().sum(0), acc.hsic, rtol=1e-14, atol=0)


def test_se_is_nan_with_one_minibatch_and_after_loading_a_state_without_terms():
    g = gen(22)
    batches = [[torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)] for _ in range(3)]
    one = MinibatchCKA()
    one.update(batches[0])
    assert torch.isnan(one.compute_se()).all()
    acc = MinibatchCKA()
    for b in batches[:2]:
        acc.update(b)
    old = acc.state_dict()
    del old["batch_hsic"]  # a state saved before the SE existed
    resumed = MinibatchCKA()
    resumed.load_state_dict(old)
    resumed.update(batches[2])
    assert torch.isnan(resumed.compute_se()).all() and resumed.batch_terms() is None
    whole = MinibatchCKA()
    for b in batches:
        whole.update(b)
    torch.testing.assert_close(resumed.compute(), whole.compute(), rtol=0, atol=1e-15)


def test_state_round_trip_keeps_the_se():
    g = gen(23)
    batches = [[torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)] for _ in range(5)]
    whole = MinibatchCKA()
    for b in batches:
        whole.update(b)
    first = MinibatchCKA()
    for b in batches[:3]:
        first.update(b)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = MinibatchCKA()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for b in batches[3:]:
        resumed.update(b)
    assert torch.equal(resumed.compute_se(), whole.compute_se())
    assert float(whole.compute_se()[0, 1]) > 0
