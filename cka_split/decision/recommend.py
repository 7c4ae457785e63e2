"""The split recommendation: K_t and the prior layers of ViT-Split, read off CKA matrices.

ViT-Split (Li et al., ICCV 2025, arXiv 2506.03433, Sec. 3) observes that a vision foundation model's
blocks fall into early blocks whose features stay the same whatever the downstream task, and late
blocks whose features diverge between tasks. Its task head copies the last ``K_t`` blocks; its prior
head reads ``K_p`` frozen layers sampled uniformly from block ``b`` to ``L-1``. The paper picks K_t,
b and K_p by hand (S/B: K_t=3, b=2, K_p=4; L: K_t=4, b=2, K_p=8). This module picks them from CKA.

**K_t, per task.** The divergence curve of a task is ``d(l) = 1 - CKA(pretrained block l, task copy
block l)`` with its jackknife SE; :mod:`cka_split.decision.divergence` finds where it leaves the blocks the
fine-tuning left (nearly) alone, judged against the SE and against the curve's own scale (a step of at
least ``STEP_RATIO`` between the noise bands), with no absolute thresholds. Then ``K_t = L - s``
clipped to [1, L-1]: the task head copies exactly the blocks the task changed. A copy that equals the
pretrained model below block s and differs from s on gives exactly ``K_t = L - s``, however small the
change. If nothing is distinguishable from noise the curve is *flat* and K_t falls back to the
published value for that depth (3 for 12 blocks, 4 for 24, 8 for 40, else round(L/4)). When the CKA
was computed on a subset of blocks, s is the block after the last listed block before the change (the
first block that may have changed), so K_t covers every block that might have diverged. The SE is
marked unreliable when it comes from fewer than :data:`cka_split.estimator.cka.MIN_SE_BATCHES` minibatches.

**b and K_p, from the pretrained model alone.** Its layer-by-layer CKA matrix M is cut into
contiguous groups: a group starts at a block and takes the following blocks while their CKA with the
group's first block is at least ``group_threshold`` (0.9). Leading blocks that form a group on their
own, before the first group of two or more, are unlike everything after them (the paper's "noisiest
features in the very first layers"): ``b = max(default_b, that count)`` (default_b = 2, the paper's).
``K_p = max(published K_p for this depth, number of groups among blocks b..L-1)``, clipped to
[2, L-b], so that uniform sampling has at least as many layers as there are distinct groups to
sample. Published K_p: 4 for 12 blocks, 8 for 24, 14 for 40, else round(L/3). When the evidence is
flat (one group), these rules give the paper's b=2 and K_p, hence its prior layers 2,5,8,11 for
12 blocks and 2,5,...,23 for 24. Prior layers follow the release's uniform rule
``S = {b + floor(i * (L-1-b) / (K_p-1)) : i = 0..K_p-1}``.

**Cost** (:mod:`cka_split.decision.cost`). With ``param_count(task, k_t, prior_layers)`` (for example
:func:`~cka_split.decision.cost.vitsplit_param_counter`, which builds ViT-Split on the meta device) each task states its
trainable parameters; with ``full_count(task)`` also full fine-tuning's, the ratio, and -- never
silently -- whether ViT-Split would be larger than full fine-tuning, naming the largest K_t that is not.
The fraction of the backbone's backward avoided and the estimated step-time ratio need only L and K_t;
the share of the summed divergence carried by the last k blocks says where it concentrates.
``max_trainable_params`` (one number, or per task ``{"seg": 12e6, "det": 40e6}``): K_t is lowered
until the model fits; the evidence says by how much. If even K_t=1 does not fit, that is a
:class:`UserError`.

``evidence`` is a list of plain sentences with the numbers behind each choice, for the report.

recommendation.json (``SplitRecommendation.to_json()``)::

    {"model": str, "num_layers": L, "pretrained": str, "tasks": [...], "settings": {...},
     "max_trainable_params": int | null,
     "per_task": {task: {"k_t", "task_head_layers", "prior_layers", "b", "k_p", "divergence_start",
                         "k_t_from_cka", "divergence": [L floats or null], "divergence_threshold",
                         "pretrained_groups": [[block, ...], ...], "trainable_params": int | null,
                         "evidence": [sentence, ...],
                         "divergence_se": [L floats or null], "divergence_kind": "step" | "gradual" | "flat",
                         "step_ratio": float | null, "pretrained_movement": [null, L-1 floats],
                         "se_batches": int, "se_reliable": bool, "max_trainable_params": int | null,
                         "full_finetune_params": int | null, "params_vs_full": float | null,
                         "backward_avoided": float, "step_time_ratio_estimate": float,
                         "larger_than_full": bool | null, "largest_k_t_below_full": int | null,
                         "divergence_share_last": [share carried by the last k blocks, k = 1..L],
                         "accepted_k_t": [K_t of every start the step test accepts; empty when flat]}}}

``max_trainable_params`` at the top is the budget as given (a number, a {task: number} map, or null).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cka_split.estimator.cka import MIN_SE_BATCHES
from vitsplit.errors import UserError
from vitsplit.model.configs import DEFAULT_B, PUBLISHED_K_P, default_k_t, prior_layers_uniform

from .cost import Budget, FullCount, ParamCount, budget_for, check_budget_tasks, json_float, split_cost
from .divergence import (
    NOISE_Z,
    NUMERIC_FLOOR,
    STEP_RATIO,
    Divergence,
    accepted_starts,
    accepted_steps,  # noqa: F401
    divergence_start,
    noise_band,
)


def default_k_p(num_layers: int) -> int:
    """The paper's K_p for this depth (4 for 12 blocks, 8 for 24, 14 for 40), else round(L/3)."""
    return int(max(2, PUBLISHED_K_P.get(num_layers, round(num_layers / 3))))


@dataclass
class TaskSplit:
    """The recommended ViT-Split configuration for one task, with the numbers behind it."""

    k_t: int
    task_head_layers: list[int]
    prior_layers: list[int]
    b: int
    k_p: int
    divergence_start: int | None
    k_t_from_cka: int
    divergence: list[float | None]
    divergence_threshold: float | None
    pretrained_groups: list[list[int]]
    trainable_params: int | None = None
    evidence: list[str] = field(default_factory=list)
    divergence_se: list[float | None] = field(default_factory=list)
    divergence_kind: str = "step"
    step_ratio: float | None = None
    pretrained_movement: list[float | None] = field(default_factory=list)
    se_batches: int = 0
    se_reliable: bool = False
    max_trainable_params: int | None = None
    full_finetune_params: int | None = None
    params_vs_full: float | None = None
    backward_avoided: float | None = None
    step_time_ratio_estimate: float | None = None
    larger_than_full: bool | None = None
    largest_k_t_below_full: int | None = None
    divergence_share_last: list[float | None] = field(default_factory=list)
    accepted_k_t: list[int] = field(default_factory=list)  # K_t of every start the step test accepts (ties)
    rgn: dict[str, Any] | None = None  # the gradient-norm rival's entry (cka_split.probes.rgn.measure_rgn), if measured


@dataclass
class SplitRecommendation:
    """What ``recommend_split`` returns; ``to_json()`` is recommendation.json's layout."""

    model: str
    num_layers: int
    pretrained: str
    tasks: list[str]
    per_task: dict[str, TaskSplit]
    settings: dict[str, Any]
    max_trainable_params: Budget = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_task"] = {t: asdict(s) for t, s in self.per_task.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SplitRecommendation":
        try:
            per_task = {t: TaskSplit(**s) for t, s in d["per_task"].items()}
            rec = cls(
                model=d["model"],
                num_layers=int(d["num_layers"]),
                pretrained=d["pretrained"],
                tasks=list(d["tasks"]),
                per_task=per_task,
                settings=dict(d["settings"]),
                max_trainable_params=d.get("max_trainable_params"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"recommendation.json does not have the expected layout ({e}); rerun 'cka-split recommend RUN'"
            ) from e
        for t, s in rec.per_task.items():
            ok_k = isinstance(s.k_t, int) and not isinstance(s.k_t, bool) and 1 <= s.k_t <= rec.num_layers
            ok_p = all(isinstance(i, int) and 0 <= i < rec.num_layers for i in s.prior_layers)
            if not (ok_k and ok_p):
                bad = f"k_t {s.k_t!r}" if not ok_k else f"prior_layers {s.prior_layers!r}"
                raise UserError(
                    f"recommendation.json gives {bad} for {t}, which is not a split of {rec.num_layers} "
                    "blocks; rerun 'cka-split recommend RUN'"
                )
        return rec

    @classmethod
    def load(cls, path: str | Path) -> "SplitRecommendation":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist; run 'cka-split analyze' or 'cka-split recommend RUN' first")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from e


# --------------------------------------------------------------------------- pretrained grouping
def layer_groups(m: np.ndarray, threshold: float = 0.9) -> list[list[int]]:
    """Contiguous groups of blocks from a model's own (L, L) CKA matrix: a group starts at a block
    and takes the next blocks while their CKA with the group's first block is >= ``threshold``.
    Returns groups of row indices, e.g. [[0], [1], [2, 3, 4], [5, 6]]."""
    m = np.asarray(m, dtype=np.float64)
    n = m.shape[0]
    groups: list[list[int]] = []
    i = 0
    while i < n:
        g = [i]
        j = i + 1
        while j < n and m[i, j] >= threshold:
            g.append(j)
            j += 1
        groups.append(g)
        i = j
    return groups


def _pretrained_structure(
    m: np.ndarray, layers: list[int], num_layers: int, *, group_threshold: float, b_default: int, k_p_default: int
) -> tuple[int, int, list[list[int]], list[str]]:
    """b, K_p, the groups (as block indices) and the evidence sentences from the pretrained (L, L) CKA."""
    groups_idx = layer_groups(m, group_threshold)
    groups = [[layers[i] for i in g] for g in groups_idx]
    ev: list[str] = []
    adjacent = [float(m[i, i + 1]) for i in range(len(layers) - 1)]
    if adjacent:
        ev.append(
            f"The pretrained model's adjacent blocks have CKA {min(adjacent):.3f} to {max(adjacent):.3f} "
            f"(mean {np.mean(adjacent):.3f})."
        )
    desc = ", ".join(f"{g[0]}" if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)
    ev.append(
        f"Grouping blocks whose CKA with the first block of their group is at least {group_threshold:g} "
        f"gives {len(groups)} group(s): {desc}."
    )
    first_multi = next((k for k, g in enumerate(groups) if len(g) >= 2), None)
    if first_multi is None:
        b_data = 0
        ev.append(
            "No two adjacent blocks are that similar, so the grouping says nothing about b or K_p; "
            "the paper's defaults are used."
        )
        n_groups_after = 0
    else:
        b_data = groups[first_multi][0]  # the leading singleton blocks
        if b_data > 0:
            ev.append(
                f"Blocks 0-{b_data - 1} each form a group of their own before the first larger group "
                f"(from block {b_data}): they are unlike the blocks after them."
            )
        else:
            ev.append("Block 0 already belongs to a group of several blocks: no leading block stands apart.")
    b = int(min(max(b_default, b_data), num_layers - 2))
    if b == b_data and b_data > b_default:
        ev.append(f"b = {b}: the prior head skips those {b} leading blocks.")
    else:
        ev.append(f"b = {b}: the paper's default (the data do not call for skipping more than {b} leading blocks).")
    if first_multi is not None:
        n_groups_after = sum(1 for g in groups if g[-1] >= b)
    k_p = int(np.clip(max(k_p_default, n_groups_after), 2, num_layers - b))
    if n_groups_after > k_p_default and k_p == n_groups_after:
        ev.append(
            f"K_p = {k_p}: blocks {b}..{num_layers - 1} span {n_groups_after} groups, more than the "
            f"published {k_p_default} for {num_layers} blocks, so one prior layer per group."
        )
    else:
        ev.append(
            f"K_p = {k_p}: the published value for {num_layers} blocks ({k_p_default}), limited to [2, L - b]; "
            f"blocks {b}..{num_layers - 1} span {n_groups_after} group(s), which does not call for more."
        )
    return b, k_p, groups, ev


# ----------------------------------------------------------------------------------- the function
def _pm(v: float, se: float) -> str:
    """'0.00052 +- 0.00004' (value +- SE; the value alone when the SE is unknown)."""
    if not np.isfinite(se):
        return f"{v:.3g}"
    return f"{v:.3g} \u00b1 {se:.2g}"


def _clip_k_t(k: int, L: int) -> int:
    """K_t limited to [1, L - 1] (a task head of at least one block, at least one frozen block)."""
    return int(np.clip(k, 1, L - 1))


def accepted_k_t(
    d: np.ndarray, se: np.ndarray, layers: list[int], L: int, *, z: float = NOISE_Z, step_ratio: float = STEP_RATIO
) -> list[int]:
    """K_t = L - start, clipped to [1, L - 1], of every start :func:`~cka_split.decision.divergence.accepted_starts`
    gives (ascending, no repeats; empty for a flat curve)."""
    return sorted({_clip_k_t(L - start, L) for start in accepted_starts(d, se, layers, z=z, step_ratio=step_ratio)})


def _task_curve(res, pretrained: str, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(d, se): d = 1 - CKA(pretrained l, task l) clipped to [0, 1], and its SE (NaN where unknown)."""
    cka_diag = np.diag(np.asarray(res.matrix(pretrained, task), dtype=np.float64))
    se_of = getattr(res, "se", None)
    se = np.diag(np.asarray(se_of(pretrained, task), dtype=np.float64)) if se_of else np.full(cka_diag.size, np.nan)
    return np.clip(1.0 - cka_diag, 0.0, 1.0), se


def _divergence_evidence(
    t: str,
    L: int,
    layers: list[int],
    d: np.ndarray,
    se: np.ndarray,
    move: np.ndarray,
    div: Divergence,
    z: float,
    step_ratio: float,
) -> tuple[int, list[str]]:
    """K_t from CKA and the sentences explaining it."""
    ev: list[str] = []
    if div.kind == "flat":
        k = default_k_t(L)
        p = div.peak
        zval = d[p] / se[p] if np.isfinite(se[p]) and se[p] > 0 else float("nan")
        n_nonzero = int((d > NUMERIC_FLOOR).sum())
        ev.append(
            f"Nothing is distinguishable from noise: no block's divergence stays above numerical precision "
            f"({NUMERIC_FLOOR:g}) at the bottom of its {z:g}-SE band (the most significant, "
            f"block {layers[p]}: {_pm(d[p], se[p])}"
            + (f", {zval:.2f} SE" if np.isfinite(zval) else "")
            + f"), so this measurement cannot tell which blocks fine-tuning for {t} changed"
            + (
                f" ({n_nonzero} block(s) have a divergence above numerical precision but within the noise; more probe "
                "images would tell)"
                if n_nonzero
                else " (the copy equals the pretrained model to numerical precision)"
            )
            + f"; K_t = {k}, the published value for {L} blocks."
        )
        return k, ev
    i = int(div.index)
    raw = L - int(div.start)
    k = _clip_k_t(raw, L)
    clip = f", clipped to {k} (K_t must be in [1, {L - 1}])" if raw != k else ""
    if div.kind == "step":
        lo, hi = noise_band(d, se, z)
        lo_j = i + int(np.argmin(lo[i:]))
        hi_j = int(np.argmax(hi[:i]))
        ratio = "more than 1e6" if div.ratio > 1e6 else f"{div.ratio:.3g}"
        below = f"the highest before it, block {layers[hi_j]}, has {_pm(d[hi_j], se[hi_j])}" + (
            " (zero to numerical precision)" if hi[hi_j] <= NUMERIC_FLOOR else ""
        )
        ev.append(
            f"The divergence steps up at block {div.start}: the lowest block from there on, block {layers[lo_j]}, has "
            f"{_pm(d[lo_j], se[lo_j])} and {below}; with both moved {z:g} SE toward each other (on the log scale) "
            f"their ratio is {ratio} (a step needs {step_ratio:g})."
        )
        if np.isfinite(move[i]) and move[i] > 0:
            ev.append(
                f"For scale: pretrained block {layers[i]} itself moves the representation by 1 - CKA(block "
                f"{layers[i - 1]}, "
                f"block {layers[i]}) = {move[i]:.3g}; fine-tuning for {t} moved block {layers[i]} by "
                f"{d[i] / move[i]:.3g} times that."
            )
        ev.append(
            f"K_t = L - {div.start} = {raw}{clip}"
            + (
                "."
                if clip
                else f": the task head copies blocks {L - k}-{L - 1}, "
                f"the ones {t} changed clearly more than the blocks before."
            )
        )
        others = [(s, r) for s, r in accepted_steps(d, se, layers, z=z, step_ratio=step_ratio) if s != div.start]
        if others:
            alt = ", ".join(f"block {s} (ratio {r:.3g}, K_t {_clip_k_t(L - s, L)})" for s, r in others)
            ev.append(
                f"The step test also accepts a start at {alt}: a step beyond noise by the same test, with a smaller "
                f"ratio than the chosen one's ({div.ratio:.3g}). Ratios move with the probe images and the copy's "
                f"steps "
                "(--finetune-steps auto treats the accepted K_t as one answer), so such a K_t also has the rule's "
                "support; "
                "a smaller one trains fewer blocks (--max-trainable-params makes the rule take it)."
            )
    else:
        best = f"the largest step ratio is {div.ratio:.3g}" if np.isfinite(div.ratio) else "there is a single block"
        ev.append(
            f"Blocks move measurably from block {layers[i]} on ({_pm(d[i], se[i])}, above numerical precision across "
            f"its "
            f"{z:g}-SE band), but the curve "
            f"rises without a clear step ({best}, a step needs {step_ratio:g}): K_t = L - {div.start} = {raw}{clip}, "
            "so the task head covers every block that moved."
        )
    return k, ev


def recommend_split(
    res,
    pretrained: str = "pretrained",
    tasks: Sequence[str] | None = None,
    max_trainable_params: Budget = None,
    *,
    param_count: ParamCount | None = None,
    full_count: FullCount | None = None,
    num_layers: int | None = None,
    model: str | None = None,
    z: float = NOISE_Z,
    step_ratio: float = STEP_RATIO,
    group_threshold: float = 0.9,
    b_default: int = DEFAULT_B,
    k_p_default: int | None = None,
) -> SplitRecommendation:
    """Recommend K_t, b, K_p and the prior layers per task from a :class:`CKAResult` (see the module
    docstring for the rules).

    res: a CKAResult with models ``pretrained`` and each task; ``res.matrix(a, b)`` -> (L_a, L_b) and
    ``res.se(a, b)`` (its SE; optional). tasks: default every model but ``pretrained``. num_layers: L
    (default: last listed block + 1). max_trainable_params: one budget, or ``{task: budget}``; K_t is
    lowered until ``param_count(task, k_t, prior_layers)`` is at most the task's budget.
    full_count(task): full fine-tuning's trainable parameters, for the comparison.
    """
    names = list(res.models)
    if pretrained not in names:
        raise UserError(f"the CKA result has no model '{pretrained}' (it has {', '.join(names)})")
    tasks = [t for t in names if t != pretrained] if tasks is None else list(tasks)
    if not tasks:
        raise UserError("no task models to recommend a split for; analyze at least one task")
    for t in tasks:
        if t not in names:
            raise UserError(
                f"unknown task '{t}': the CKA result holds {', '.join(n for n in names if n != pretrained)}"
            )
    check_budget_tasks(max_trainable_params, tasks)
    if max_trainable_params is not None and param_count is None:
        raise UserError("a trainable-parameter budget needs the model architecture to count parameters")
    p_layers = [int(x) for x in res.layers[pretrained]]
    L = int(num_layers if num_layers is not None else p_layers[-1] + 1)
    if L < 2:
        raise UserError(f"a ViT-Split needs at least 2 blocks; this model has {L}")
    kp_def = default_k_p(L) if k_p_default is None else int(k_p_default)
    m_pp = np.asarray(res.matrix(pretrained, pretrained), dtype=np.float64)
    b, k_p, groups, ev_prior = _pretrained_structure(
        m_pp, p_layers, L, group_threshold=group_threshold, b_default=b_default, k_p_default=kp_def
    )
    prior = prior_layers_uniform(L, k_p, b)
    ev_prior.append(f"Prior layers by the uniform rule from block {b} to {L - 1}: {prior}.")
    move = np.array([np.nan] + [1.0 - m_pp[i - 1, i] for i in range(1, len(p_layers))])  # 1 - CKA(pre l-1, pre l)
    se_batches = int(getattr(res, "se_batches", 0))
    reliable = se_batches >= MIN_SE_BATCHES
    if se_batches == 0:
        ev_se = (
            "No SE is known (a CKA file from before the SE, or built without it): the divergence is not judged "
            "against noise, only against numerical precision; rerun 'cka-split analyze' for a noise-aware "
            "recommendation."
        )
    elif not reliable:
        ev_se = (
            f"The SEs come from {se_batches} minibatch(es), fewer than the {MIN_SE_BATCHES} they need to be reliable "
            "(README); they are unreliable, and so is every judgement against noise below. Use more probe images."
        )
    else:
        ev_se = f"Each value is given \u00b1 its leave-one-minibatch-out jackknife SE over {se_batches} minibatches."

    per_task: dict[str, TaskSplit] = {}
    for t in tasks:
        t_layers = [int(x) for x in res.layers[t]]
        if t_layers != p_layers:
            raise UserError(
                f"model '{t}' was analysed at blocks {t_layers}, the pretrained one at {p_layers}; rerun analyze with "
                f"the same layers"
            )
        d, se = _task_curve(res, pretrained, t)
        div = divergence_start(d, se, p_layers, z=z, step_ratio=step_ratio)
        ev = [
            f"Divergence 1 - CKA(pretrained, {t}) per block: "
            + ", ".join(f"{l}: {_pm(v, e)}" for l, v, e in zip(p_layers, d, se))
            + ".",
            ev_se,
        ]
        k_cka, ev_div = _divergence_evidence(t, L, p_layers, d, se, move, div, z, step_ratio)
        budget = budget_for(max_trainable_params, t)
        k_t, cost, ev_cost = split_cost(
            t, L, k_cka, prior, d, param_count=param_count, full_count=full_count, budget=budget
        )
        per_task[t] = TaskSplit(
            k_t=k_t,
            task_head_layers=list(range(L - k_t, L)),
            prior_layers=list(prior),
            b=b,
            k_p=k_p,
            divergence_start=div.start,
            k_t_from_cka=k_cka,
            divergence=[float(v) for v in d],
            divergence_threshold=div.threshold,
            pretrained_groups=groups,
            evidence=ev + ev_div + ev_cost + ev_prior,
            divergence_se=[json_float(v) for v in se],
            divergence_kind=div.kind,
            step_ratio=json_float(div.ratio) if div.kind != "flat" else None,
            pretrained_movement=[json_float(v) for v in move],
            se_batches=se_batches,
            se_reliable=reliable,
            max_trainable_params=budget,
            accepted_k_t=accepted_k_t(d, se, p_layers, L, z=z, step_ratio=step_ratio),
            **cost,
        )
    settings = dict(
        noise_z=z,
        step_ratio=step_ratio,
        numeric_floor=NUMERIC_FLOOR,
        min_se_batches=MIN_SE_BATCHES,
        group_threshold=group_threshold,
        b_default=b_default,
        k_p_default=kp_def,
    )
    return SplitRecommendation(
        model=model or "",
        num_layers=L,
        pretrained=pretrained,
        tasks=list(tasks),
        per_task=per_task,
        settings=settings,
        max_trainable_params=max_trainable_params,
    )
