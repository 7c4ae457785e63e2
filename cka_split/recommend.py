"""The split recommendation: K_t and the prior layers of ViT-Split, read off CKA matrices.

ViT-Split (Li et al., ICCV 2025, arXiv 2506.03433, Sec. 3) observes that a vision foundation model's
blocks fall into early blocks whose features stay the same whatever the downstream task, and late
blocks whose features diverge between tasks. Its task head copies the last ``K_t`` blocks; its prior
head reads ``K_p`` frozen layers sampled uniformly from block ``b`` to ``L-1``. The paper picks K_t,
b and K_p by hand (S/B: K_t=3, b=2, K_p=4; L: K_t=4, b=2, K_p=8). This module picks them from CKA.

**K_t, per task.** The divergence curve of a task is ``d(l) = 1 - CKA(pretrained block l, task copy
block l)`` (clipped to [0, 1]). Blocks the fine-tuning left alone sit on a low early plateau; the
blocks the task rewrote rise above it. With ``base = min_l d(l)`` and ``range = max_l d(l) - base``,
a block has *left the plateau* when ``d(l) > base + max(abs_tol, rel_tol * range)`` (defaults 0.005
and 0.1). ``divergence_start`` s is the first block that has left the plateau and stays off it for
at least ``min_run`` consecutive blocks (2; fewer if the model ends first), so a single noisy
early block does not count. Then ``K_t = L - s`` clipped to [1, L-1]: the task head copies exactly
the blocks the task changed. A copy that equals the pretrained model below block s and differs from
s on has d = 0 below s and d > 0 from s, so it gives exactly ``K_t = L - s``. If the curve's range
is below ``flat_tol`` (0.02) the task did not move the model measurably, and K_t falls back to the
published value for that depth (3 for 12 blocks, 4 for 24, 8 for 40, else round(L/4)) -- unless the
whole flat curve sits above ``high_tol`` (0.1): then every block changed alike and K_t = L-1. When the CKA
was computed on a subset of blocks, s is the block after the last listed block still on the plateau
(the first block that may have changed), so K_t covers every block that might have diverged.

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

**Budget.** With ``max_trainable_params`` and a ``param_count(task, k_t, prior_layers)`` callable
(for example :func:`vitsplit_param_counter`, which builds ViT-Split on the meta device), K_t is
lowered one block at a time until the model fits; the evidence says by how much. If even K_t=1 does
not fit, that is a :class:`UserError`.

``evidence`` is a list of plain sentences with the numbers behind each choice, for the report.

recommendation.json (``SplitRecommendation.to_json()``)::

    {"model": str, "num_layers": L, "pretrained": str, "tasks": [...], "settings": {...},
     "max_trainable_params": int | null,
     "per_task": {task: {"k_t", "task_head_layers", "prior_layers", "b", "k_p", "divergence_start",
                         "k_t_from_cka", "divergence": [L floats or null], "divergence_threshold",
                         "pretrained_groups": [[block, ...], ...], "trainable_params": int | null,
                         "evidence": [sentence, ...]}}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vitsplit.backbones import Backbone, create_vit, resolve_name
from vitsplit.errors import UserError
from vitsplit.model import ViTSplit, count_trainable
from vitsplit.model.configs import DEFAULT_B, PUBLISHED_K_P, default_k_t, prior_layers_uniform

ParamCount = Callable[[str, int, list[int]], int]


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
    rgn: dict[str, Any] | None = None  # the gradient-norm rival's entry (cka_split.rgn.measure_rgn), if measured


@dataclass
class SplitRecommendation:
    """What ``recommend_split`` returns; ``to_json()`` is recommendation.json's layout."""

    model: str
    num_layers: int
    pretrained: str
    tasks: list[str]
    per_task: dict[str, TaskSplit]
    settings: dict[str, Any]
    max_trainable_params: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_task"] = {t: asdict(s) for t, s in self.per_task.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SplitRecommendation":
        try:
            per_task = {t: TaskSplit(**s) for t, s in d["per_task"].items()}
            return cls(model=d["model"], num_layers=int(d["num_layers"]), pretrained=d["pretrained"],
                       tasks=list(d["tasks"]), per_task=per_task, settings=dict(d["settings"]),
                       max_trainable_params=d.get("max_trainable_params"))
        except (KeyError, TypeError) as e:
            raise UserError(f"recommendation.json does not have the expected layout ({e}); rerun 'cka-split recommend RUN'") from e

    @classmethod
    def load(cls, path: str | Path) -> "SplitRecommendation":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist; run 'cka-split analyze' or 'cka-split recommend RUN' first")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from e


# ------------------------------------------------------------------------------ divergence start
@dataclass
class Divergence:
    """Result of :func:`divergence_start` on one curve."""

    start: int | None        # first diverged block (None: flat curve)
    threshold: float | None  # plateau level + tolerance (None: flat)
    base: float
    spread: float


def divergence_start(curve: Sequence[float], layers: Sequence[int] | None = None, *, abs_tol: float = 0.005,
                     rel_tol: float = 0.1, flat_tol: float = 0.02, min_run: int = 2,
                     high_tol: float = 0.1) -> Divergence:
    """Where a divergence curve leaves its early plateau.

    curve: (n,) values of d = 1 - CKA at the blocks ``layers`` (ascending; default 0..n-1).
    Returns the first block of the first run of ``min_run`` consecutive points above
    ``min(d) + max(abs_tol, rel_tol * (max(d) - min(d)))`` (a run may be shorter where it reaches the
    last point). With a layer subset the start is the block after the last plateau point before that
    run. A flat curve (max(d) - min(d) < flat_tol) gives ``start`` None, or the first block if the
    whole curve sits above ``high_tol`` (every block changed alike).
    """
    d = np.asarray(curve, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise UserError("a divergence curve must be a non-empty list of finite numbers; the CKA matrix holds NaN or is empty")
    layers = list(range(d.size)) if layers is None else [int(x) for x in layers]
    base, spread = float(d.min()), float(d.max() - d.min())
    if spread < flat_tol:  # flat: nothing changed, or (high) every block changed alike
        return Divergence(layers[0] if base > high_tol else None, None, base, spread)
    thr = base + max(abs_tol, rel_tol * spread)
    above = d > thr
    n = d.size
    for i in range(n):
        run = above[i:i + min_run]
        if run.all():  # a run truncated by the model's end counts
            start = layers[i] if i == 0 else layers[i - 1] + 1
            return Divergence(start, thr, base, spread)
    # Every point above the threshold is an isolated spike followed by a return to the plateau.
    return Divergence(None, thr, base, spread)


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


def _pretrained_structure(m: np.ndarray, layers: list[int], num_layers: int, *, group_threshold: float,
                          b_default: int, k_p_default: int) -> tuple[int, int, list[list[int]], list[str]]:
    """b, K_p, the groups (as block indices) and the evidence sentences from the pretrained (L, L) CKA."""
    groups_idx = layer_groups(m, group_threshold)
    groups = [[layers[i] for i in g] for g in groups_idx]
    ev: list[str] = []
    adjacent = [float(m[i, i + 1]) for i in range(len(layers) - 1)]
    if adjacent:
        ev.append(f"The pretrained model's adjacent blocks have CKA {min(adjacent):.3f} to {max(adjacent):.3f} "
                  f"(mean {np.mean(adjacent):.3f}).")
    desc = ", ".join(f"{g[0]}" if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)
    ev.append(f"Grouping blocks whose CKA with the first block of their group is at least {group_threshold:g} "
              f"gives {len(groups)} group(s): {desc}.")
    first_multi = next((k for k, g in enumerate(groups) if len(g) >= 2), None)
    if first_multi is None:
        b_data = 0
        ev.append("No two adjacent blocks are that similar, so the grouping says nothing about b or K_p; "
                  "the paper's defaults are used.")
        n_groups_after = 0
    else:
        b_data = groups[first_multi][0]  # the leading singleton blocks
        if b_data > 0:
            ev.append(f"Blocks 0-{b_data - 1} each form a group of their own before the first larger group "
                      f"(from block {b_data}): they are unlike the blocks after them.")
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
        ev.append(f"K_p = {k_p}: blocks {b}..{num_layers - 1} span {n_groups_after} groups, more than the "
                  f"published {k_p_default} for {num_layers} blocks, so one prior layer per group.")
    else:
        ev.append(f"K_p = {k_p}: the published value for {num_layers} blocks ({k_p_default}), limited to [2, L - b]; "
                  f"blocks {b}..{num_layers - 1} span {n_groups_after} group(s), which does not call for more.")
    return b, k_p, groups, ev


# ----------------------------------------------------------------------------------- the function
def recommend_split(res, pretrained: str = "pretrained", tasks: Sequence[str] | None = None,
                    max_trainable_params: int | None = None, *, param_count: ParamCount | None = None,
                    num_layers: int | None = None, model: str | None = None, abs_tol: float = 0.005,
                    rel_tol: float = 0.1, flat_tol: float = 0.02, high_tol: float = 0.1, min_run: int = 2,
                    group_threshold: float = 0.9,
                    b_default: int = DEFAULT_B, k_p_default: int | None = None) -> SplitRecommendation:
    """Recommend K_t, b, K_p and the prior layers per task from a :class:`CKAResult` (see the module
    docstring for the rules).

    res: a CKAResult with models ``pretrained`` and each task; ``res.matrix(a, b)`` -> (L_a, L_b).
    tasks: default every model but ``pretrained``. num_layers: L (default: last listed block + 1).
    max_trainable_params: lower K_t until ``param_count(task, k_t, prior_layers)`` is at most this.
    """
    names = list(res.models)
    if pretrained not in names:
        raise UserError(f"the CKA result has no model '{pretrained}' (it has {', '.join(names)})")
    tasks = [t for t in names if t != pretrained] if tasks is None else list(tasks)
    if not tasks:
        raise UserError("no task models to recommend a split for; analyze at least one task")
    for t in tasks:
        if t not in names:
            raise UserError(f"unknown task '{t}': the CKA result holds {', '.join(n for n in names if n != pretrained)}")
    if max_trainable_params is not None and param_count is None:
        raise UserError("a trainable-parameter budget needs the model architecture to count parameters")
    p_layers = [int(x) for x in res.layers[pretrained]]
    L = int(num_layers if num_layers is not None else p_layers[-1] + 1)
    if L < 2:
        raise UserError(f"a ViT-Split needs at least 2 blocks; this model has {L}")
    kp_def = default_k_p(L) if k_p_default is None else int(k_p_default)
    m_pp = np.asarray(res.matrix(pretrained, pretrained), dtype=np.float64)
    b, k_p, groups, ev_prior = _pretrained_structure(m_pp, p_layers, L, group_threshold=group_threshold,
                                                     b_default=b_default, k_p_default=kp_def)
    prior = prior_layers_uniform(L, k_p, b)
    ev_prior.append(f"Prior layers by the uniform rule from block {b} to {L - 1}: {prior}.")

    per_task: dict[str, TaskSplit] = {}
    for t in tasks:
        t_layers = [int(x) for x in res.layers[t]]
        if t_layers != p_layers:
            raise UserError(f"model '{t}' was analysed at blocks {t_layers}, the pretrained one at {p_layers}; rerun analyze with the same layers")
        cka_diag = np.diag(np.asarray(res.matrix(pretrained, t), dtype=np.float64))
        d = np.clip(1.0 - cka_diag, 0.0, 1.0)
        div = divergence_start(d, p_layers, abs_tol=abs_tol, rel_tol=rel_tol, flat_tol=flat_tol, min_run=min_run,
                               high_tol=high_tol)
        ev: list[str] = []
        curve = ", ".join(f"{l}:{v:.3f}" for l, v in zip(p_layers, d))
        ev.append(f"Divergence 1 - CKA(pretrained, {t}) per block: {curve}.")
        if div.start is not None and div.threshold is None:
            k_cka = L - 1
            ev.append(f"The curve is flat but high (every block at least {div.base:.3f} > {high_tol:g}): fine-tuning for {t} "
                      f"changed every block alike, so K_t = L - 1 = {k_cka}.")
        elif div.start is None:
            k_cka = default_k_t(L)
            if div.threshold is None:
                ev.append(f"The curve is flat (range {div.spread:.3f} < {flat_tol:g}): fine-tuning for {t} did not "
                          f"change any block measurably, so K_t = {k_cka}, the published value for {L} blocks.")
            else:
                ev.append(f"No block stays above the plateau threshold {div.threshold:.3f} for {min_run} blocks: "
                          f"K_t = {k_cka}, the published value for {L} blocks.")
        else:
            raw = L - div.start
            k_cka = int(np.clip(raw, 1, L - 1))
            ev.append(f"The early plateau is at {div.base:.3f}; the curve leaves it (above {div.threshold:.3f} = plateau + "
                      f"max({abs_tol:g}, {rel_tol:g} x range {div.spread:.3f})) at block {div.start} and stays above it.")
            ev.append(f"K_t = L - {div.start} = {raw}" + (f", clipped to {k_cka} (K_t must be in [1, {L - 1}])." if raw != k_cka
                                                             else f": the task head copies blocks {L - k_cka}-{L - 1}, the ones {t} changed."))
        k_t, n_params = k_cka, None
        if param_count is not None:
            n_params = n0 = int(param_count(t, k_t, prior))
            if max_trainable_params is not None and n_params > max_trainable_params:
                while k_t > 1 and n_params > max_trainable_params:
                    k_t -= 1
                    n_params = int(param_count(t, k_t, prior))
                if n_params > max_trainable_params:
                    raise UserError(f"ViT-Split for {t} needs {n_params / 1e6:.2f}M trainable parameters even with K_t=1, "
                                    f"more than --max-trainable-params {max_trainable_params / 1e6:.2f}M; raise the budget")
                ev.append(f"With K_t = {k_cka} ViT-Split has {n0 / 1e6:.3f}M trainable parameters, more than the budget of {max_trainable_params / 1e6:.3f}M; "
                          f"K_t lowered to {k_t} ({n_params / 1e6:.3f}M).")
            else:
                ev.append(f"ViT-Split for {t} with K_t = {k_t} has {n_params / 1e6:.3f}M trainable parameters"
                          + (f", within the budget of {max_trainable_params / 1e6:.3f}M." if max_trainable_params is not None else "."))
        per_task[t] = TaskSplit(
            k_t=k_t, task_head_layers=list(range(L - k_t, L)), prior_layers=list(prior), b=b, k_p=k_p,
            divergence_start=div.start, k_t_from_cka=k_cka, divergence=[float(v) for v in d],
            divergence_threshold=div.threshold, pretrained_groups=groups, trainable_params=n_params,
            evidence=ev + ev_prior,
        )
    settings = dict(abs_tol=abs_tol, rel_tol=rel_tol, flat_tol=flat_tol, high_tol=high_tol, min_run=min_run,
                    group_threshold=group_threshold, b_default=b_default, k_p_default=kp_def)
    return SplitRecommendation(model=model or "", num_layers=L, pretrained=pretrained, tasks=list(tasks),
                               per_task=per_task, settings=settings,
                               max_trainable_params=None if max_trainable_params is None else int(max_trainable_params))


def vitsplit_param_counter(backbone_name: str, num_classes: dict[str, int]) -> ParamCount:
    """``param_count(task, k_t, prior_layers)`` that builds the model engineer's ViTSplit on the meta
    device (no memory, no weights) and counts its trainable parameters. Results are cached."""
    spec = resolve_name(backbone_name)
    cache: dict[tuple, int] = {}

    def count(task: str, k_t: int, prior_layers: list[int]) -> int:
        key = (task, k_t, tuple(prior_layers))
        if key not in cache:
            with torch.device("meta"):
                bb = Backbone(create_vit(spec), name=backbone_name, weights_source="meta")
                m = ViTSplit(bb, k_t=k_t, prior_layers=list(prior_layers), task=task,
                             num_classes=int(num_classes.get(task, 150)))
            cache[key] = int(count_trainable(m))
        return cache[key]

    return count
