"""Leave-one-minibatch-out jackknife SE of minibatch CKA (Quenouille 1956; Tukey 1958; Efron & Stein
1981, "The jackknife estimate of variance", Ann. Statist.), from the per-minibatch HSIC terms that
:class:`cka_split.estimator.cka.MinibatchCKA` keeps (see that module's docstring)."""

from __future__ import annotations

import torch


def _cka_ratio(hsic: torch.Tensor) -> torch.Tensor:
    """(..., F, F) summed HSIC -> (..., F, F) CKA without warnings; NaN where HSIC_xx * HSIC_yy <= 0."""
    d = torch.diagonal(hsic, dim1=-2, dim2=-1)
    denom = d[..., :, None] * d[..., None, :]
    out = hsic / torch.sqrt(denom.clamp_min(0))
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def jackknife_se(batch_hsic: torch.Tensor) -> torch.Tensor:
    """Leave-one-minibatch-out jackknife SE of every CKA entry.

    batch_hsic: (B, F, F) float64 per-minibatch HSIC terms. Returns (F, F) float64:
    sqrt((B-1)/B * sum_b (theta_(-b) - theta_bar)^2) with theta_(-b) the CKA of sum_{c != b} h_c.
    NaN where B < 2 or where a leave-one-out CKA is undefined.
    """
    b = int(batch_hsic.shape[0])
    f = int(batch_hsic.shape[-1])
    if b < 2:
        return torch.full((f, f), float("nan"), dtype=torch.float64)
    h = batch_hsic.to(torch.float64)
    return se_from_replicates(_cka_ratio(h.sum(dim=0, keepdim=True) - h))  # replicates (B, F, F)


def se_from_replicates(loo: torch.Tensor) -> torch.Tensor:
    """The jackknife SE from leave-one-out replicates of any statistic.

    loo: (B, ...) the statistic computed without replicate b. Returns (...) float64
    sqrt((B-1)/B * sum_b (loo_b - mean_b loo_b)^2); NaN where B < 2.
    """
    loo = loo.to(torch.float64)
    b = int(loo.shape[0])
    if b < 2:
        return torch.full(loo.shape[1:], float("nan"), dtype=torch.float64)
    dev = loo - loo.mean(dim=0, keepdim=True)
    return torch.sqrt((b - 1) / b * (dev * dev).sum(dim=0))
