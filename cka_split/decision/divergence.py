"""Where a task's divergence curve leaves the blocks the fine-tuning left (nearly) alone, judged
against the CKA estimate's noise and against the curve's own scale -- no absolute thresholds.

The divergence of a task copy at block l is ``d(l) = 1 - CKA(pretrained block l, copy block l)``, with
``se(l)`` its leave-one-minibatch-out jackknife SE (:func:`cka_split.estimator.cka.jackknife_se`). Every decision
below compares divergences by their ratio, so each value gets its noise band on the log scale:
``[lo, hi] = d * exp(-+ NOISE_Z * se / d)`` (the delta method: SE(log d) = SE(d) / d). This keeps the
band of a positive quantity positive: ``d`` is 0 exactly when the two blocks' features agree up to a
rotation and a scale on every probe image (Kornblith et al. 2019, CKA's invariances), and then its SE is
0 too; any ``d > 0`` means the blocks differ, and the noise says by how much, not whether.

1. **Moved.** Block l moved when ``lo(l) > NUMERIC_FLOOR``. If no block moved, the curve is *flat*:
   nothing differs from the pretrained model beyond numerical precision and noise (the evidence gives the
   most significant ``d +- se``).
2. **A step.** For every candidate start i (the first block of the changed segment), the step ratio
   ``r(i) = min_{l >= i} lo(l) / max(NUMERIC_FLOOR, max_{l < i} hi(l))`` compares the *lowest* block of
   the segment from i on with the *highest* block before it, both taken at the noisy end of their
   bands. The start is the i with the largest ratio (the cleanest separation; ties go to the earlier
   block), provided ``r(i) >= STEP_RATIO``: every block from i on diverges at least twice as much as
   any block before it, beyond noise. A ratio is dimensionless, so the rule reads a copy whose blocks
   barely move the representation (adjacent-block CKA 0.999, divergences 1e-3) exactly as one whose
   blocks move it a lot (DINOv2, divergences 0.1): what counts is how much more the late blocks changed
   than the early ones, not an absolute number. Below the start the curve may be exactly zero (copies
   equal to the pretrained model there: r is then about ``lo / NUMERIC_FLOOR``, huge) or a noisy low
   plateau (every block changed slightly, the late ones clearly more).
3. **No step.** Blocks moved but no candidate reaches ``STEP_RATIO`` (a curve that rises gradually):
   the start is the first block that moved, so the task head covers every block that changed.

Constants (their false-positive rates are measured by ``benchmarks/recommend_error_rates.py`` and
given in the README):

- ``NOISE_Z = 3``: half-width of the noise band in SEs of log d. A one-sided normal tail of 0.13 % per
  value; the jackknife SE from B minibatches behaves like a t with B - 1 degrees of freedom, wider tails
  with few minibatches (hence :data:`cka_split.estimator.cka.MIN_SE_BATCHES`).
- ``STEP_RATIO = 2``: "clearly more" means at least twice the divergence of every earlier block (after
  both are moved to the unfavourable end of their noise bands). A curve growing like (l + 1)^p from
  block 0 has its largest ratio at block 1, 2^p, which is a start at block 1: K_t = L - 1, as for a
  copy that changed everywhere.
- ``NUMERIC_FLOOR = 1e-10``: a divergence below this is zero. Float64 CKA of identical features is 1
  to about 1e-15 (the tests assert 1e-12); the smallest divergence the rule must see is 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vitsplit.errors import UserError

NOISE_Z = 3.0
STEP_RATIO = 2.0
NUMERIC_FLOOR = 1e-10


@dataclass
class Divergence:
    """Result of :func:`divergence_start` on one curve.

    ``kind``: "step" (a clear step at ``start``), "gradual" (blocks moved, no clear step; ``start`` is
    the first that moved), "flat" (nothing distinguishable from noise; ``start`` None).
    ``index``: position of ``start`` in the curve (None when flat); ``ratio``: the best step ratio
    (inf when the plateau is exactly zero); ``threshold``: the plateau's upper noise bound
    ``max_{l < start} hi(l)`` (None when flat or when the start is the first point).
    """

    kind: str
    start: int | None
    index: int | None
    ratio: float
    threshold: float | None
    peak: int  # index of the largest d / se (the most significant point)


def noise_band(d: np.ndarray, se: np.ndarray, z: float = NOISE_Z) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) = d * exp(-+ z * se / d), (0, 0) where d = 0; an unknown (NaN) SE counts as 0 (no noise judged)."""
    d = np.clip(np.asarray(d, dtype=np.float64), 0.0, None)
    s = np.where(np.isfinite(se), se, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(d > 0, s / np.where(d > 0, d, 1.0), 0.0)
    return d * np.exp(-z * rel), d * np.exp(z * rel)


def step_ratios(d: np.ndarray, se: np.ndarray, *, z: float = NOISE_Z, floor: float = NUMERIC_FLOOR) -> np.ndarray:
    """(n,) step ratio r(i) of every candidate start i (r(0) = NaN: no block before it); see the module."""
    lo, hi = noise_band(d, se, z)
    n = d.size
    r = np.full(n, np.nan)
    for i in range(1, n):
        below = max(float(hi[:i].max()), floor)
        r[i] = float(lo[i:].min()) / below
    return r


def accepted_steps(
    curve: Sequence[float],
    se: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    *,
    z: float = NOISE_Z,
    step_ratio: float = STEP_RATIO,
    floor: float = NUMERIC_FLOOR,
) -> list[tuple[int, float]]:
    """(start block, step ratio) of every candidate start the step test accepts (``r(i) >= step_ratio``),
    ascending. The rule (:func:`divergence_start`) takes the one with the largest ratio; two or more are a
    tie it breaks by a ratio that is itself a noisy estimate: each is a step "beyond noise" in the rule's sense."""
    d = np.asarray(curve, dtype=np.float64)
    s = np.full(d.size, np.nan) if se is None else np.asarray(se, dtype=np.float64)
    layers = list(range(d.size)) if layers is None else [int(x) for x in layers]
    r = step_ratios(d, s, z=z, floor=floor)
    return [(layers[i - 1] + 1, float(r[i])) for i in range(1, d.size) if r[i] >= step_ratio]


def accepted_starts(
    curve: Sequence[float],
    se: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    *,
    z: float = NOISE_Z,
    step_ratio: float = STEP_RATIO,
    floor: float = NUMERIC_FLOOR,
) -> list[int]:
    """The starts of :func:`accepted_steps`; without any, the rule's own start (a gradual curve) or
    nothing (a flat one)."""
    div = divergence_start(curve, se, layers, z=z, step_ratio=step_ratio, floor=floor)
    if div.kind != "step":
        return [] if div.start is None else [int(div.start)]
    return [start for start, _ in accepted_steps(curve, se, layers, z=z, step_ratio=step_ratio, floor=floor)]


def divergence_start(
    curve: Sequence[float],
    se: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    *,
    z: float = NOISE_Z,
    step_ratio: float = STEP_RATIO,
    floor: float = NUMERIC_FLOOR,
) -> Divergence:
    """Where a divergence curve leaves the blocks the task left (nearly) alone (module docstring).

    curve: (n,) d = 1 - CKA at the blocks ``layers`` (ascending; default 0..n-1); se: (n,) its SE
    (None or NaN: no noise judged). With a layer subset the start is the block after the last point
    before the changed segment (the first block that may have changed).
    """
    d = np.asarray(curve, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise UserError(
            "a divergence curve must be a non-empty list of finite numbers; the CKA matrix holds NaN or is empty"
        )
    s = np.full(d.size, np.nan) if se is None else np.asarray(se, dtype=np.float64)
    if s.shape != d.shape:
        raise ValueError(f"se has shape {s.shape}, the curve {d.shape}")
    layers = list(range(d.size)) if layers is None else [int(x) for x in layers]
    lo, hi = noise_band(d, s, z)
    with np.errstate(divide="ignore", invalid="ignore"):
        zs = np.where(np.isfinite(s) & (s > 0), d / s, np.where(d > floor, np.inf, 0.0))
    peak = int(np.argmax(zs))
    moved = lo > floor
    if not moved.any():
        return Divergence("flat", None, None, float("nan"), None, peak)

    def start_at(i: int) -> int:
        return layers[0] if i == 0 else layers[i - 1] + 1

    r = step_ratios(d, s, z=z, floor=floor)
    if d.size > 1 and np.nanmax(r) >= step_ratio:
        i = int(np.nanargmax(r))  # first index of the maximum: ties go to the earlier block
        return Divergence("step", start_at(i), i, float(r[i]), float(max(hi[:i].max(), floor)), peak)
    i = int(np.argmax(moved))
    best = float(np.nanmax(r)) if d.size > 1 else float("nan")
    return Divergence("gradual", start_at(i), i, best, None if i == 0 else float(max(hi[:i].max(), floor)), peak)
