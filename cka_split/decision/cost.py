"""What a recommended split costs: trainable parameters (ViT-Split's and full fine-tuning's, counted
on the meta device), the share of the backbone's backward pass it avoids, an estimated step-time
ratio, per-task parameter budgets, and how the divergence is spread over the last blocks.

**Step-time estimate.** Per training step full fine-tuning runs the L blocks forward and backward;
ViT-Split runs the L frozen blocks forward (no graph) and its K_t task-head copies forward and
backward. With a block's backward costing twice its forward (two matrix products per forward one:
gradients of activations and of weights; Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", Sec. 2.1), a step costs 3L block-forwards under full fine-tuning and L + 3 K_t under
ViT-Split, so the backbone's step-time ratio is ``(L + 3 K_t) / (3 L)``. The heads are not included:
ViT-Split's prior head and fusion add work that full fine-tuning's plain head does not (README,
"Measured performance": at DINOv2-S and 224 px ViT-Split's measured step is 0.97x full fine-tuning's,
at L 0.56x against the estimate's 0.50x).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from vitsplit.errors import UserError
from vitsplit.ranges import POSITIVE

ParamCount = Callable[[str, int, list[int]], int]
FullCount = Callable[[str], int]
Budget = int | dict[str, int] | None


def json_float(v: float) -> float | None:
    """A float for JSON: None for NaN and infinities."""
    return float(v) if np.isfinite(v) else None


def backward_avoided(num_layers: int, k_t: int) -> float:
    """Fraction of the backbone's block backward passes ViT-Split does not run: (L - K_t) / L."""
    return (num_layers - k_t) / num_layers


def step_time_ratio(num_layers: int, k_t: int) -> float:
    """Estimated backbone step time of ViT-Split / full fine-tuning: (L + 3 K_t) / (3 L) (module docstring)."""
    return (num_layers + 3 * k_t) / (3 * num_layers)


def divergence_share(d: np.ndarray) -> list[float]:
    """(n,) divergence -> share of sum(d) carried by the last k points, k = 1..n (1.0 at k = n;
    all NaN when the curve sums to 0)."""
    d = np.clip(np.asarray(d, dtype=np.float64), 0.0, None)
    total = float(d.sum())
    if not total > 0:
        return [float("nan")] * d.size
    return [float(v) for v in np.cumsum(d[::-1]) / total]


def parse_budget(text: str | None, option: str = "--max-trainable-params") -> Budget:
    """'12' -> 12_000_000 (millions, every task); 'seg=12,det=40' -> {'seg': 12_000_000, 'det': 40_000_000}."""
    if text is None or text.strip() == "":
        return None
    text = text.replace(" ", "")

    def millions(v: str) -> int:
        try:
            x = float(v)
        except ValueError:
            raise UserError(f"{option} takes millions of parameters (12 or seg=12,det=40), not '{text}'") from None
        problem = POSITIVE.problem(x)
        if problem is not None:
            raise UserError(f"{option} {text}: a budget {problem}")
        return int(round(x * 1e6))

    if "=" not in text:
        return millions(text)
    out: dict[str, int] = {}
    for item in text.split(","):
        task, sep, value = item.partition("=")
        if not sep or not task or not value:
            raise UserError(f"{option} takes NUMBER or TASK=NUMBER,TASK=NUMBER (e.g. seg=12,det=40), not '{text}'")
        if task in out:
            raise UserError(f"{option} names task '{task}' twice")
        out[task] = millions(value)
    return out


def budget_for(budget: Budget, task: str) -> int | None:
    """The parameter budget of one task (a dict without the task: no budget for it)."""
    if budget is None or isinstance(budget, int):
        return budget
    return budget.get(task)


def check_budget_tasks(budget: Budget, tasks: list[str], option: str = "--max-trainable-params") -> None:
    if isinstance(budget, Mapping):
        for t in budget:
            if t not in tasks:
                raise UserError(f"{option} names task '{t}', which is not analysed ({', '.join(tasks)})")


def full_finetune_param_counter(backbone_name: str, num_classes: dict[str, int]) -> FullCount:
    """``count(task)``: trainable parameters of full fine-tuning (every backbone parameter plus the
    task's head, :class:`vitsplit.model.Baseline` method "full": the head of method "linear" plus the
    backbone), built on the meta device."""
    import torch

    from vitsplit.backbones import Backbone, create_vit, resolve_name
    from vitsplit.model import Baseline, count_trainable

    spec = resolve_name(backbone_name)
    cache: dict[str, int] = {}

    def count(task: str) -> int:
        if task not in cache:
            with torch.device("meta"):  # "linear" has full's head on a frozen backbone (and hashes no weights)
                bb = Backbone(create_vit(spec), name=backbone_name, weights_source="meta")
                m = Baseline(bb, "linear", task, int(num_classes.get(task, 150)))
            cache[task] = int(count_trainable(m)) + sum(p.numel() for p in bb.parameters())
        return cache[task]

    return count


def vitsplit_param_counter(backbone_name: str, num_classes: dict[str, int]) -> ParamCount:
    """``param_count(task, k_t, prior_layers)`` that builds the model engineer's ViTSplit on the meta
    device (no memory, no weights) and counts its trainable parameters. Results are cached."""
    import torch

    from vitsplit.backbones import Backbone, create_vit, resolve_name
    from vitsplit.model import ViTSplit, count_trainable

    spec = resolve_name(backbone_name)
    cache: dict[tuple, int] = {}

    def count(task: str, k_t: int, prior_layers: list[int]) -> int:
        key = (task, k_t, tuple(prior_layers))
        if key not in cache:
            with torch.device("meta"):
                bb = Backbone(create_vit(spec), name=backbone_name, weights_source="meta")
                m = ViTSplit(
                    bb, k_t=k_t, prior_layers=list(prior_layers), task=task, num_classes=int(num_classes.get(task, 150))
                )
            cache[key] = int(count_trainable(m))
        return cache[key]

    return count


def largest_k_t_within(
    param_count: ParamCount, task: str, prior: list[int], limit: int, k_max: int
) -> tuple[int, int] | None:
    """The largest K_t <= k_max whose ViT-Split has at most ``limit`` trainable parameters, and that
    count; None if not even K_t = 1 fits."""
    for k in range(k_max, 0, -1):
        n = int(param_count(task, k, prior))
        if n <= limit:
            return k, n
    return None


def split_cost(
    t: str,
    L: int,
    k_t: int,
    prior: list[int],
    d: np.ndarray,
    *,
    param_count: ParamCount | None,
    full_count: FullCount | None,
    budget: int | None,
) -> tuple[int, dict[str, Any], list[str]]:
    """Apply ``budget`` to task t's K_t (from CKA) and state what the split costs.

    d: (L,) the task's divergence curve. Returns (K_t after the budget, the cost fields of
    recommendation.json's per-task entry, evidence sentences)."""
    k_cka = k_t
    ev: list[str] = []
    info: dict[str, Any] = {
        "trainable_params": None,
        "full_finetune_params": None,
        "params_vs_full": None,
        "larger_than_full": None,
        "largest_k_t_below_full": None,
    }
    if param_count is not None:
        n = n0 = int(param_count(t, k_t, prior))
        if budget is not None and n > budget:
            fit = largest_k_t_within(param_count, t, prior, budget, k_t)
            if fit is None:
                raise UserError(
                    f"ViT-Split for {t} needs {int(param_count(t, 1, prior)) / 1e6:.2f}M trainable parameters even "
                    f"with K_t=1, more than --max-trainable-params {budget / 1e6:.2f}M for {t}; raise the budget"
                )
            k_t, n = fit
            ev.append(
                f"With K_t = {k_cka} ViT-Split has {n0 / 1e6:.3f}M trainable parameters, more than the budget of "
                f"{budget / 1e6:.3f}M for {t}; K_t lowered to {k_t} ({n / 1e6:.3f}M)."
            )
        else:
            ev.append(
                f"ViT-Split for {t} with K_t = {k_t} has {n / 1e6:.3f}M trainable parameters"
                + (f", within the budget of {budget / 1e6:.3f}M." if budget is not None else ".")
            )
        info["trainable_params"] = n
        if full_count is not None:
            full = int(full_count(t))
            info.update(full_finetune_params=full, params_vs_full=n / full, larger_than_full=n > full)
            if n > full:
                fit = largest_k_t_within(param_count, t, prior, full, k_t)
                info["largest_k_t_below_full"] = None if fit is None else fit[0]
                ev.append(
                    f"Warning: this ViT-Split trains more parameters than full fine-tuning ({n / 1e6:.3f}M vs "
                    f"{full / 1e6:.3f}M, {n / full:.2f}x); "
                    + (
                        f"the largest K_t that does not is {fit[0]} ({fit[1] / 1e6:.3f}M)."
                        if fit
                        else "even K_t = 1 does (the prior head and fusion alone are larger)."
                    )
                )
            else:
                info["largest_k_t_below_full"] = k_t
                ev.append(f"That is {n / full:.2f}x the {full / 1e6:.3f}M parameters of full fine-tuning.")
    avoided, ratio = backward_avoided(L, k_t), step_time_ratio(L, k_t)
    ev.append(
        f"Frozen below block {L - k_t}, ViT-Split avoids {avoided:.0%} of the backbone's backward pass; estimated "
        f"backbone step time {ratio:.2f}x full fine-tuning's ((L + 3 K_t) / 3L: backward = 2 forwards, heads not "
        "counted)."
    )
    share = divergence_share(d)
    if np.isfinite(share[0]):
        ks = sorted({1, 2, 3, k_t} & set(range(1, L + 1)))
        ev.append(
            "Share of the summed divergence carried by the last blocks: "
            + ", ".join(f"last {k}: {share[k - 1]:.0%}" for k in ks)
            + (f"; the task head's {k_t} block(s) carry {share[k_t - 1]:.0%}." if k_t in ks else ".")
        )
    info.update(
        backward_avoided=avoided, step_time_ratio_estimate=ratio, divergence_share_last=[json_float(v) for v in share]
    )
    return k_t, info, ev
