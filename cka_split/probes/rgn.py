"""The gradient-norm rival of the CKA selector: Auto-RGN's relative gradient norms per block (Lee et al.,
"Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023), and a rule that turns
them into ViT-Split's K_t.

**Score.** For block i of the pretrained backbone, ``RGN_i = ||g_i|| / ||theta_i||``: theta_i is every
parameter of the block, g_i the gradient of the task's loss with respect to them. The loss is the one
the analysis's task copies are fine-tuned with (:class:`vitsplit.model.Baseline`, method ``full``: the
task's head, freshly initialised with the run's seed, on the final feature map, every block trainable
for the gradient), on the first ``batches`` minibatches those copies would see (the trainer's data order,
:class:`vitsplit.engine.StepBatches`); nothing is updated. Lee et al. compute RGN at each step of
fine-tuning; here it is the value at its start, averaged over ``batches`` minibatches (default 5), with
the per-block standard error over them. Cost: ``batches`` forward and backward passes.

**Rule (K_t from the scores).** A ViT-Split configuration splits the blocks in two: shared blocks
0..s-1 (frozen, read by the prior head) and task-specific blocks s..L-1 (copied and trained, K_t = L - s).
The rule fits exactly that two-segment model to the profile: s is the boundary whose two-segment
constant fit of ``log RGN`` explains the most of its variance (R^2; the least-squares single change
point, the first step of binary segmentation, Scott & Knott 1974); ties go to the smaller K_t. On the
log scale a step is a ratio, the same at every magnitude, so one block that dwarfs the rest (the last
block's gradient often does) does not pull the boundary onto itself as it does on the raw scale
(``tests/test_rgn.py`` has both profiles). Blocks with no gradient are floored at the largest score
times float32's epsilon (:data:`RGN_FLOOR`): below that a gradient norm is float32 rounding of the
largest one, so the floor is a unit, not a tuned constant.

A profile always has a best boundary, also when it has no step (random weights give RGN within a few
per cent across blocks). So the step is kept only when a permutation test says it is more than
block-to-block fluctuation: the best R^2 against the best R^2 of :data:`PERMUTATIONS` random block orders
of the same scores (Antoch & Huskova 2001, permutation tests in change-point analysis), at level
:data:`ALPHA` = 0.05. Measured false-positive rate on profiles without a step (1000 profiles of i.i.d.
log-normal scores, sd 0.1): 4.2% at L = 12, 4.9% at L = 24, 5.5% at L = 40. The price of a test
that knows nothing but the block order: one block standing out at an end reaches at best p ~ 2/L (0.17
for 12 blocks), and no step at all can be accepted below 8 blocks (p >= 2/C(L, L/2)). Then, and
whenever the test fails, the profile is "flat" and RGN gives the published K_t
(:func:`vitsplit.model.configs.default_k_t`), as the CKA rule does for a flat curve. A kept step up
gives K_t = L - s. A kept step down (the gradient concentrates in the early blocks, an "input-level
shift" in Lee et al.'s terms, for which they tune the first blocks) gives K_t = L - 1, the nearest
ViT-Split (which retrains only late blocks) can do; the evidence says so.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cka_split.decision.recommend import ParamCount, SplitRecommendation, TaskSplit
from vitsplit.backbones import Backbone
from vitsplit.data import build_dataset, collate
from vitsplit.engine import StepBatches
from vitsplit.engine.sampler import EpochItems
from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write_json, read_json
from vitsplit.model import Baseline
from vitsplit.model.configs import default_k_t, default_split
from vitsplit.model.heads import det_preset_for
from vitsplit.progress import NULL_PROGRESS, Progress
from vitsplit.ranges import COUNT

SELECTORS = ("cka", "rgn", "both")
DEFAULT_BATCHES = 5  # Lee et al.'s Auto-RGN: "a few" minibatches; five as the issue and their setup use
RGN_FLOOR = float(np.finfo(np.float32).eps)  # relative to the largest score (module docstring)
ALPHA = 0.05  # the step test's level: its false-positive rate on profiles without a step (module docstring)
PERMUTATIONS = 1999  # block orders drawn for the test (p-value resolution 1/2000)
PERMUTATION_SEED = 0  # the permutations are fixed, so the same scores always give the same K_t


def check_rgn_options(selector: str, batches: int) -> None:
    """``analyze``'s --selector and --rgn-batches, checked before any work."""
    if selector not in SELECTORS:
        raise UserError(f"--selector {selector}: use cka, rgn or both")
    COUNT.check("--rgn-batches", batches)


@dataclass
class RGNChoice:
    """The rule's answer for one profile: K_t, the first task-specific block s = L - K_t (None when the
    profile is flat), the ratio of the geometric means of RGN after and before s, the step's
    permutation p-value, and the sentences behind it."""

    k_t: int
    start: int | None
    ratio: float | None
    p_value: float | None
    kind: str  # "step" (late blocks get more), "early" (early blocks get more) or "flat"
    evidence: list[str] = field(default_factory=list)


def step_fit(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-segment fits of profiles ``y`` (P, L) at every boundary s = 1..L-1: the explained fraction
    R^2 = 1 - SSE_2(s) / SSE_1 (P, L-1) and the step, mean(y[s:]) - mean(y[:s]) (P, L-1)."""
    P, L = y.shape
    s = np.arange(1, L)
    c = np.cumsum(y, axis=1)[:, :-1]  # sums of y[:s]
    tot = y.sum(axis=1, keepdims=True)
    mean_a, mean_b = c / s, (tot - c) / (L - s)
    sse1 = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1, keepdims=True)
    sse2 = (y**2).sum(axis=1, keepdims=True) - s * mean_a**2 - (L - s) * mean_b**2
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(sse1 > 0, 1.0 - sse2 / sse1, 0.0)
    return r2, mean_b - mean_a


def _best(r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per profile, the largest R^2 over the boundaries and its boundary s; ties go to the later
    boundary (the smaller K_t)."""
    idx = r2.shape[1] - 1 - np.argmax(r2[:, ::-1], axis=1)
    return r2[np.arange(len(r2)), idx], idx + 1


def rgn_k_t(scores: Sequence[float], *, alpha: float = ALPHA, permutations: int = PERMUTATIONS) -> RGNChoice:
    """K_t from per-block scores (L,): the least-squares change point of log RGN, kept when a permutation
    test says the step is not block-to-block fluctuation (module docstring)."""
    r = np.asarray(scores, dtype=np.float64)
    L = len(r)
    if L < 2 or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise UserError(f"RGN needs finite non-negative scores for at least 2 blocks, got {list(r)}")
    if r.max() <= 0:
        raise UserError("no block of the backbone received any gradient from the task's loss; RGN cannot choose K_t")
    y = np.log(np.maximum(r, r.max() * RGN_FLOOR))[None]
    perm = np.random.default_rng(PERMUTATION_SEED).permuted(np.repeat(y, permutations, axis=0), axis=1)
    r2, step = step_fit(y)
    r2_null, _ = step_fit(perm)
    fit, s = _best(r2)
    s0 = int(s[0])
    p = float((1 + np.sum(_best(r2_null)[0] >= fit[0] - 1e-12)) / (1 + permutations))
    if not (fit[0] > 0 and p <= alpha):
        k = default_k_t(L)
        return RGNChoice(
            k_t=k,
            start=None,
            ratio=None,
            p_value=p,
            kind="flat",
            evidence=[
                f"The relative gradient norms ||g||/||theta|| show no step beyond block-to-block fluctuation (best "
                f"two-segment fit: permutation p = {p:.3g} > {alpha:g}; with {L} blocks one block standing out at an "
                f"end "
                f"cannot reach p < {2 / L:.2g}), so RGN gives the published K_t = {k}."
            ],
        )
    kind = "step" if step[0, s0 - 1] > 0 else "early"
    ratio = float(np.exp(y[0, s0:].mean() - y[0, :s0].mean()))
    if kind == "early":
        return RGNChoice(
            k_t=L - 1,
            start=1,
            ratio=ratio,
            p_value=p,
            kind=kind,
            evidence=[
                f"The relative gradient norm falls at block {s0} (blocks {s0}-{L - 1} get {ratio:.3g}x the gradient of "
                f"blocks "
                f"0-{s0 - 1}, permutation p = {p:.3g}): the task pulls hardest on the early blocks, a shift Lee et al. "
                f"fine-tune "
                f"early blocks for. ViT-Split retrains only late blocks; the nearest it can do is K_t = {L - 1}."
            ],
        )
    return RGNChoice(
        k_t=L - s0,
        start=s0,
        ratio=ratio,
        p_value=p,
        kind=kind,
        evidence=[
            f"Relative gradient norms ||g||/||theta|| step up at block {s0}: blocks {s0}-{L - 1} get {ratio:.3g}x the "
            f"gradient "
            f"(geometric mean) of blocks 0-{s0 - 1}, the best two-segment fit of log RGN (permutation p = {p:.3g}), so "
            f"RGN "
            f"picks K_t = {L - s0}."
        ],
    )


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device) if torch.is_tensor(v) else [t.to(device) for t in v] if isinstance(v, list) else v)
        for k, v in batch.items()
    }


def block_rgn(model: Baseline, batches: Sequence[dict[str, Any]], device: torch.device) -> np.ndarray:
    """(n_batches, L) float64: ||g_i|| / ||theta_i|| of every block i for each minibatch's loss."""
    blocks = list(model.backbone.vit.blocks)
    theta = [torch.sqrt(sum((p.detach().double() ** 2).sum() for p in b.parameters())).item() for b in blocks]
    out = np.zeros((len(batches), len(blocks)))
    for n, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        model.loss(_to(batch, device))["loss"].backward()
        for i, b in enumerate(blocks):
            g2 = sum((p.grad.double() ** 2).sum() for p in b.parameters() if p.grad is not None)
            out[n, i] = float(torch.sqrt(torch.as_tensor(g2))) / theta[i] if theta[i] > 0 else 0.0
    return out


def measure_rgn(
    backbone: Backbone,
    task: str,
    data_spec: str,
    *,
    batches: int = DEFAULT_BATCHES,
    batch_size: int = 8,
    crop: int = 224,
    seed: int = 0,
    device: str | torch.device = "cpu",
    masks: bool = True,
) -> dict[str, Any]:
    """RGN of ``task`` on ``backbone`` (left untouched) and the K_t it gives: recommendation.json's
    ``rgn`` entry: {"k_t", "scores" (L,), "se" (L,), "batches", "batch_size", "ratio", "evidence", "seconds"}."""
    if batches < 1:
        raise UserError(f"RGN needs at least 1 minibatch, got {batches}")
    t0 = time.perf_counter()
    device = torch.device(device)
    torch.manual_seed(seed)
    data = build_dataset(data_spec, "train", task=task, crop=crop, augment=True, seed=seed)
    loader = torch.utils.data.DataLoader(
        EpochItems(data),
        collate_fn=collate,
        batch_sampler=StepBatches(len(data), seed, batch_size, 1, 0, 1, 0, batches),
    )
    model = (
        Baseline(copy.deepcopy(backbone), "full", task, data.num_classes, masks=masks, det_preset=det_preset_for(crop))
        .to(device)
        .train()
    )
    per_batch = block_rgn(model, list(loader), device)
    scores = per_batch.mean(axis=0)
    se = per_batch.std(axis=0, ddof=1) / np.sqrt(len(per_batch)) if len(per_batch) > 1 else np.full(len(scores), np.nan)
    choice = rgn_k_t(scores)
    return {
        "k_t": choice.k_t,
        "scores": scores.tolist(),
        "se": [None if np.isnan(v) else float(v) for v in se],
        "batches": int(len(per_batch)),
        "batch_size": int(batch_size),
        "kind": choice.kind,
        "start": choice.start,
        "ratio": choice.ratio,
        "p_value": choice.p_value,
        "evidence": choice.evidence,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def rgn_for_tasks(
    backbone: Backbone, data: dict[str, str], *, progress: Progress = NULL_PROGRESS, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """{task: :func:`measure_rgn`} for ``data`` = {task: data spec}; ``kwargs`` go to measure_rgn."""
    out = {}
    for task, spec in data.items():
        out[task] = measure_rgn(backbone, task, spec, **kwargs)
        progress.log(
            f"RGN for {task}: K_t {out[task]['k_t']} ({out[task]['batches']} minibatches, {out[task]['seconds']:.1f} s)"
        )
    return out


def attach_rgn(rec: SplitRecommendation, rgn: dict[str, dict[str, Any]]) -> SplitRecommendation:
    """Record each task's RGN entry in the recommendation (recommendation.json's per_task[task]["rgn"])."""
    for task, entry in rgn.items():
        if task in rec.per_task:
            rec.per_task[task].rgn = entry
    return rec


def rgn_recommendation(
    rgn: dict[str, dict[str, Any]], *, model: str, num_layers: int, param_count: ParamCount | None = None
) -> SplitRecommendation:
    """The recommendation of ``analyze --selector rgn`` (no task copies, no CKA): each task's K_t is RGN's;
    the prior layers follow the published rule for the depth (:func:`vitsplit.model.configs.default_split`)."""
    _, prior, source = default_split(num_layers)
    per_task = {}
    for task, entry in rgn.items():
        k = int(entry["k_t"])
        per_task[task] = TaskSplit(
            k_t=k,
            task_head_layers=list(range(num_layers - k, num_layers)),
            prior_layers=list(prior),
            b=prior[0],
            k_p=len(prior),
            divergence_start=None,
            k_t_from_cka=None,
            divergence=[],
            divergence_threshold=None,
            pretrained_groups=[],
            trainable_params=param_count(task, k, list(prior)) if param_count else None,
            evidence=[
                *entry["evidence"],
                f"Prior layers {', '.join(map(str, prior))}: the {source} for {num_layers} blocks "
                "(--selector rgn measures no CKA).",
            ],
            rgn=entry,
        )
    return SplitRecommendation(
        model=model,
        num_layers=num_layers,
        pretrained="pretrained",
        tasks=list(rgn),
        per_task=per_task,
        settings={"selector": "rgn"},
    )


def save_rgn(path: str | Path, rgn: dict[str, dict[str, Any]]) -> Path:
    """RUN/rgn.json: {task: entry}, so that ``cka-split recommend RUN`` keeps the RGN entries."""
    return atomic_write_json(path, rgn)


def load_rgn(path: str | Path) -> dict[str, dict[str, Any]]:
    """RUN/rgn.json's entries, or {} when the run measured no RGN."""
    return read_json(path) if Path(path).is_file() else {}
