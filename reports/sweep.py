"""The sweep section of the report: what training at every K_t measured, next to what the selectors picked.

A sweep is a directory ``cka-split sweep`` wrote (``SWEEP/sweep.json``, :mod:`vitsplit.sweep.grid`). Which
sweeps belong to an analysis run ``RUN``: those given explicitly (``cka-split report RUN --sweep DIR``),
every directory under ``RUN`` holding a ``sweep.json``, and every directory beside ``RUN`` whose
``sweep.json`` names ``RUN`` as its ``analysis`` (``cka-split sweep --auto-split RUN`` / ``--analysis RUN``).

Per sweep: the task's metric against K_t (mean and SD over seeds, every seed as a dot, the baselines as
horizontal lines) drawn on the block axis (K_t = L - s puts K_t's first task-specific block s under it),
above the divergence curve 1 - CKA(pretrained block l, task copy block l) (with its standard error
where the run has one) and the RGN profile on the same blocks; the CKA pick, the RGN pick and the
sweep's best are marked on both. Then the cost (trainable parameters, step time) against K_t.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from matplotlib.figure import Figure

from vitsplit.sweep.grid import TIE_POINTS, TIE_SDS, tie_tolerance

from . import figures as F
from .rundir import RunData, slug
from .sections import _diag, _figure, pretrained_name
from .text import fmt_params

PICK_STYLE = {"CKA": ("#d62728", "-"), "RGN": ("#2ca02c", "--")}
BEST_COLOR = "#ff7f0e"


@dataclass
class Sweep:
    """One sweep directory as the report shows it."""

    path: Path
    data: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.data.get("task") or "?")

    def groups(self) -> dict[str, dict[str, Any]]:
        """ViT-Split summary key -> {"k_t", "mean", "sd", "n", "seeds" (values), "points"}."""
        out: dict[str, dict[str, Any]] = {}
        for key, s in (self.data.get("summary") or {}).items():
            pts = [
                p
                for p in self.data.get("points") or []
                if p.get("method") == "vitsplit" and p.get("metric") is not None and _key(p, "@" in key) == key
            ]
            out[key] = {"k_t": int(key.split("@")[0]), **s, "seeds": [p["metric"] for p in pts], "points": pts}
        return out


def _key(p: dict[str, Any], with_prior: bool) -> str:
    return f"{p['k_t']}@{','.join(map(str, p.get('prior_layers') or []))}" if with_prior else str(p["k_t"])


def read_sweep(path: str | Path, problems: list[str]) -> Sweep | None:
    p = Path(path)
    try:
        d = json.loads((p / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"sweep {p} has no readable sweep.json ({e}); it is left out.")
        return None
    if not isinstance(d, dict) or not isinstance(d.get("points"), list):
        problems.append(f"{p / 'sweep.json'} is not a sweep (no points list); it is left out.")
        return None
    return Sweep(p, d)


def find_sweeps(
    run_dir: str | Path, extra: Iterable[str | Path] | None = None, problems: list[str] | None = None
) -> list[Sweep]:
    """The sweeps linked to ``run_dir`` (module docstring), each once."""
    run = Path(run_dir).resolve()
    probs = [] if problems is None else problems
    found: list[Sweep] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            s = read_sweep(p, probs)
            if s is not None:
                found.append(s)

    for p in extra or []:
        add(Path(p))
    for p in sorted(run.iterdir()):
        if (p / "sweep.json").is_file():
            add(p)
    for p in sorted(run.parent.iterdir()):
        if p.is_dir() and not p.is_symlink() and (p / "sweep.json").is_file() and p.resolve() not in seen:
            try:
                link = json.loads((p / "sweep.json").read_text(encoding="utf-8")).get("analysis")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if link and Path(link).resolve() == run:
                add(p)
    return found


def _picks(data: RunData, sw: Sweep) -> dict[str, int]:
    """CKA and RGN K_t for the sweep's task: this run's recommendation, else what sweep.json recorded."""
    task = (data.recommendation or {}).get("per_task", {}).get(sw.task)
    if isinstance(task, dict):
        out = {"CKA": task.get("k_t"), "RGN": (task.get("rgn") or {}).get("k_t")}
        if (data.recommendation or {}).get("settings", {}).get("selector") == "rgn":
            out["CKA"] = None  # an RGN-only analysis: its k_t is RGN's
    else:
        picks = sw.data.get("picks") or {}
        out = {"CKA": picks.get("cka"), "RGN": picks.get("rgn")}
    return {k: int(v) for k, v in out.items() if v is not None}


def _divergence(data: RunData, task: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(d, se) per block: the recommendation's divergence curve (the rule's input), else 1 - same-block CKA."""
    per = ((data.recommendation or {}).get("per_task") or {}).get(task) or {}
    d = per.get("divergence")
    if d and all(v is not None for v in d):
        se = per.get("divergence_se")
        return np.asarray(d, float), (np.asarray(se, float) if se and all(v is not None for v in se) else None)
    cka, pre = data.cka, pretrained_name(data)
    if cka is None or pre is None or task not in cka.models:
        return None
    _, diag = _diag(cka, pre, task)
    se = None
    if hasattr(cka.result, "se"):
        try:
            se = np.diag(cka.result.se(pre, task).detach().cpu().numpy()).astype(float)
        except Exception:  # noqa: BLE001 -- a result without SE: the band is left out
            se = None
    return 1.0 - diag, se


def metric_figure(
    sw: Sweep, L: int, picks: dict[str, int], div: tuple[np.ndarray, np.ndarray | None] | None, rgn: list[float] | None
) -> Figure:
    """Top: metric (mean +- SD, seeds as dots) at block s = L - K_t, baselines as lines; bottom: the
    divergence curve (+- SE) and the RGN profile on the same blocks. Picks and the best are marked."""
    metric, higher = sw.data.get("metric", "metric"), bool(sw.data.get("higher_is_better", True))
    groups = sw.groups()
    fig = Figure(figsize=(7.4, 6.0))
    ax, bx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    priors = sorted({k.split("@")[1] for k in groups if "@" in k}) or [""]
    for i, prior in enumerate(priors):
        gs = sorted((g for k, g in groups.items() if k.endswith(f"@{prior}") or not prior), key=lambda g: g["k_t"])
        x = np.array([L - g["k_t"] for g in gs], float)
        ax.errorbar(
            x,
            [g["mean"] for g in gs],
            yerr=[g["sd"] or 0.0 for g in gs],
            fmt="o-",
            color=F.task_color(i),
            capsize=3,
            lw=1.5,
            label="ViT-Split, mean +- SD over seeds" + (f" (prior {prior})" if prior else ""),
        )
        for g, xi in zip(gs, x):
            ax.plot([xi] * len(g["seeds"]), g["seeds"], ".", color="grey", ms=4, alpha=0.7)
    for j, (m, s) in enumerate((sw.data.get("baselines") or {}).items()):
        c = F.PALETTE[(j + 3) % len(F.PALETTE)]
        ax.axhline(s["mean"], color=c, ls=":", lw=1.4, label=f"{m} (mean over {s['n']})")
        if s.get("sd"):
            ax.axhspan(s["mean"] - s["sd"], s["mean"] + s["sd"], color=c, alpha=0.08, lw=0)
    best = sw.data.get("best_k_t")
    if best is not None:
        b = max((g for g in groups.values() if g["k_t"] == best), key=lambda g: g["mean"] * (1 if higher else -1))
        ax.plot([L - best], [b["mean"]], "*", color=BEST_COLOR, ms=16, mec="black", zorder=5, label=f"best K_t={best}")
    for axis in (ax, bx):
        for name, k in picks.items():
            color, ls = PICK_STYLE[name]
            axis.axvline(L - k, color=color, ls=ls, lw=1.3, label=f"{name} pick K_t={k}" if axis is ax else None)
    ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(f"{sw.task}: {metric} against K_t (top axis); first task-specific block below", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    top = ax.secondary_xaxis("top", functions=(lambda s: L - s, lambda k: L - k))
    top.set_xlabel("K_t")
    if div is not None:
        d, se = div
        blocks = np.arange(len(d))
        bx.plot(blocks, d, "o-", color=F.PALETTE[0], ms=3.5, lw=1.4, label="divergence 1 - CKA")
        if se is not None:
            bx.fill_between(blocks, d - se, d + se, color=F.PALETTE[0], alpha=0.2, lw=0, label="+- SE")
        bx.set_ylabel("1 - CKA (same block)")
        bx.legend(fontsize=7, loc="upper left")
    if rgn is not None and len(rgn):
        rx = bx.twinx()
        r = np.asarray(rgn, float)
        rx.plot(
            np.arange(len(r)),
            r / r.max() if r.max() > 0 else r,
            "s--",
            color=PICK_STYLE["RGN"][0],
            ms=3,
            lw=1,
            label="RGN / max",
        )
        if np.all(r > 0) and r.max() / r.min() > 20:
            rx.set_yscale("log")
        rx.set_ylabel("relative gradient norm / max", fontsize=8)
        rx.legend(fontsize=7, loc="upper center")
    bx.set_xlabel("block (K_t = L - first task-specific block)")
    bx.set_xlim(-0.5, L - 0.5)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def cost_figure(sw: Sweep, full_params: int | None) -> Figure:
    """Trainable parameters (left) and step time (right, mean +- SD over seeds) against K_t."""
    pts = [p for p in sw.data.get("points") or [] if p.get("method") == "vitsplit"]
    ks = sorted({p["k_t"] for p in pts})
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    params = [
        next((p["trainable_params"] for p in pts if p["k_t"] == k and p.get("trainable_params")), np.nan) for k in ks
    ]
    ax.plot(ks, np.asarray(params, float) / 1e6, "o-", color=F.PALETTE[0], label="trainable parameters (M)")
    if full_params:
        ax.axhline(full_params / 1e6, color=F.PALETTE[0], ls=":", lw=1.2, label="full fine-tuning (M)")
    ax.set_xlabel("K_t")
    ax.set_ylabel("trainable parameters (M)")
    tx = ax.twinx()
    times = [[p["step_time_s"] for p in pts if p["k_t"] == k and p.get("step_time_s")] for k in ks]
    mean = [np.mean(t) if t else np.nan for t in times]
    sd = [np.std(t, ddof=1) if len(t) > 1 else 0.0 for t in times]
    tx.errorbar(ks, mean, yerr=sd, fmt="s--", color=F.PALETTE[1], capsize=3, label="step time (s)")
    tx.set_ylabel("seconds per step")
    ax.set_title(f"{sw.task}: cost against K_t", fontsize=10)
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = tx.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7.5, loc="upper left")
    fig.tight_layout()
    return fig


def _pick_verdict(
    data: RunData,
    sw: Sweep,
    picks: dict[str, int],
    groups: dict[int, dict[str, Any]],
    best_mean: float,
    pooled: float | None,
) -> list[str]:
    """Which pick ties the best (vitsplit.sweep.grid.tie_tolerance) and what each cost: when RGN ties for
    less, the sentence says to start with RGN."""
    sign = 1.0 if sw.data.get("higher_is_better", True) else -1.0
    tol = tie_tolerance(pooled)
    ties = {n: sign * (best_mean - groups[k]["mean"]) <= tol for n, k in picks.items() if k in groups}
    if not ties:
        return []
    rule = f"within max({TIE_POINTS:g} point, {TIE_SDS:g} pooled seed SD) = {tol:.2f} of the best"
    per = ((data.recommendation or {}).get("per_task") or {}).get(sw.task) or {}
    rgn_s = (per.get("rgn") or {}).get("seconds")
    total = (data.config or {}).get("seconds")
    rgn_all = sum(
        float((t.get("rgn") or {}).get("seconds") or 0.0)
        for t in ((data.recommendation or {}).get("per_task") or {}).values()
        if isinstance(t, dict)
    )
    cka_s = float(total) - rgn_all if total is not None and "CKA" in ties else None
    cost = (
        f" RGN took {float(rgn_s):.1f} s; the copies' fine-tuning and CKA took {cka_s:.0f} s."
        if rgn_s is not None and cka_s is not None
        else ""
    )
    if ties.get("CKA") and ties.get("RGN"):
        cheaper = rgn_s is not None and cka_s is not None and float(rgn_s) < cka_s
        return [
            f"Both picks are {rule}"
            + (
                ", and RGN cost less: start with RGN (`analyze --selector rgn`), and "
                "fine-tune copies for CKA only where its pick is in doubt."
                if cheaper
                else "."
            )
            + cost
        ]
    if ties.get("RGN") and "CKA" in ties:
        return [f"Only RGN's pick is {rule}; CKA's is not: on this sweep RGN is the better selector.{cost}"]
    if ties.get("CKA") and "RGN" in ties:
        return [f"Only CKA's pick is {rule}; RGN's is not.{cost}"]
    if len(ties) == 1:
        ((name, ok),) = ties.items()
        return [f"{name}'s pick is {'' if ok else 'not '}{rule}.{cost}"]
    return [f"Neither pick is {rule}: on this sweep, the sweep itself is the better guide.{cost}"]


def _sentences(data: RunData, sw: Sweep, picks: dict[str, int]) -> list[str]:
    groups = {g["k_t"]: g for g in sw.groups().values()}
    best, pooled, metric = sw.data.get("best_k_t"), sw.data.get("pooled_sd"), sw.data.get("metric", "metric")
    if best is None or best not in groups:
        return ["No ViT-Split point of this sweep has finished yet."]
    b = groups[best]
    seeds = {len(g["seeds"]) for g in groups.values()}
    out = [
        f"The sweep's best K_t is {best}: {metric} {b['mean']:.2f}"
        + (f" +- {b['sd']:.2f}" if b["sd"] else "")
        + f" over {b['n']} seed(s) ({len(groups)} K_t values, {'/'.join(map(str, sorted(seeds)))} seeds each)."
    ]
    for name, k in picks.items():
        if k not in groups:
            out.append(f"{name} picked K_t {k}, which this sweep did not train.")
            continue
        diff = groups[k]["mean"] - b["mean"]
        sd = (
            f"; the pooled seed SD is {pooled:.2f}, so that is {abs(diff) / pooled:.1f} SD"
            if pooled
            else " (one seed: no seed SD to compare with)"
        )
        out.append(f"{name} picked K_t {k}: {metric} {groups[k]['mean']:.2f}, {diff:+.2f} against the best{sd}.")
    out += _pick_verdict(data, sw, picks, groups, b["mean"], pooled)
    for m, s in (sw.data.get("baselines") or {}).items():
        out.append(
            f"Baseline {m}: {metric} {s['mean']:.2f}"
            + (f" +- {s['sd']:.2f}" if s.get("sd") else "")
            + f" ({s['n']} seed(s))."
        )
    if sw.data.get("pending"):
        out.append(
            f"{len(sw.data['pending'])} point(s) have not finished (the sweep was stopped); run the same sweep again "
            f"to complete it."
        )
    return out


def sweep_section(data: RunData, sweeps: list[Sweep]) -> list[dict[str, Any]] | None:
    """Template entries, one per sweep: title, path, sentences, table rows and figures."""
    if not sweeps:
        return None
    L = (data.recommendation or {}).get("num_layers") or (data.config or {}).get("models", {}).get(
        "pretrained", {}
    ).get("num_layers")
    out = []
    for i, sw in enumerate(sweeps):
        picks = _picks(data, sw)
        groups = sw.groups()
        n_layers = int(L) if L else max([g["k_t"] for g in groups.values()] + list(picks.values()) + [1]) + 1
        per = ((data.recommendation or {}).get("per_task") or {}).get(sw.task) or {}
        rgn = (per.get("rgn") or {}).get("scores")
        mark = {k: " ".join(n for n, kk in picks.items() if kk == k) for k in {g["k_t"] for g in groups.values()}}
        rows = []
        for key, g in sorted(groups.items(), key=lambda kv: kv[1]["k_t"]):
            p0 = g["points"][0] if g["points"] else {}
            steps = [p["step_time_s"] for p in g["points"] if p.get("step_time_s")]
            mems = [p["peak_memory_mb"] for p in g["points"] if p.get("peak_memory_mb")]
            rows.append(
                {
                    "k_t": key,
                    "n": g["n"],
                    "mean": f"{g['mean']:.2f}",
                    "sd": "-" if g["sd"] is None else f"{g['sd']:.2f}",
                    "params": fmt_params(p0.get("trainable_params")),
                    "step": f"{np.mean(steps):.3f} s" if steps else "-",
                    "memory": f"{max(mems):,.0f} MB" if mems else "-",
                    "marks": " ".join(
                        x
                        for x in (("best" if g["k_t"] == sw.data.get("best_k_t") else ""), mark.get(g["k_t"], ""))
                        if x
                    ),
                }
            )
        div = _divergence(data, sw.task)
        figs = [
            _figure(
                F.png_bytes(metric_figure(sw, n_layers, picks, div, rgn)),
                f"{sw.task}: {sw.data.get('metric')} against K_t",
                "Top: the metric of every sweep point (grey dots: seeds; error bars: SD over seeds) at its first "
                "task-specific "
                "block (K_t on the top axis); dotted lines: the baselines. Bottom: the divergence curve of the "
                "analysis "
                "(band: +- SE where measured) and the RGN profile on the same blocks. Vertical lines: the CKA (solid) "
                "and "
                "RGN (dashed) picks; star: the sweep's best.",
                f"sweep-{i}-{slug(sw.task)}",
            )
        ]
        full = next((p.get("trainable_params") for p in sw.data.get("points") or [] if p.get("method") == "full"), None)
        figs.append(
            _figure(
                F.png_bytes(cost_figure(sw, full)),
                f"{sw.task}: cost against K_t",
                "Trainable parameters of each K_t (dotted: full fine-tuning, where the sweep trained it) and the "
                "measured seconds per optimisation step (mean +- SD over seeds; noisy on a shared machine).",
                f"sweep-{i}-cost",
            )
        )
        out.append(
            {
                "title": f"{sw.task} sweep",
                "path": str(sw.path.resolve()),
                "sentences": _sentences(data, sw, picks),
                "rows": rows,
                "metric": sw.data.get("metric", "metric"),
                "figures": figs,
            }
        )
    return out
