"""``cka-split sweep``: ViT-Split trained at several K_t (and prior-layer choices) and seeds, and the
baselines at the same budget; one ordinary training run per point, and ``SWEEP/sweep.json``.

The honest alternative to reading K_t off CKA is the paper's own K_t ablation (Li et al., ICCV 2025,
ViT-Split): train at every K_t and keep the best. A sweep does exactly that with the trainer
(:func:`vitsplit.engine.train`), so that every point is a plain training run:

- ``SWEEP/<point>/``: the training run directory of one point (``docs/run-directory.md``), named
  ``kt03-s0`` (ViT-Split, K_t 3, seed 0), ``kt03-p2.5.8.11-s0`` (prior layers given explicitly) or
  ``linear-s0`` (a baseline). Every point uses the same options (data, schedule, iterations, batch,
  crop, learning rate rule, ...) and differs only in method, K_t, prior layers and seed.
- ``SWEEP/sweep.json`` (written atomically after each point): ``task``, ``metric`` (the task's main
  metric, :data:`METRICS`), ``higher_is_better``, ``analysis`` (the analysis run it is linked to, or
  null), ``picks`` (that run's CKA and RGN K_t for the task), ``config`` (the shared options and the
  grid), ``points`` (finished points: ``k_t`` (null for a baseline), ``prior_layers``, ``method``,
  ``head``, ``seed``, ``run`` (relative to SWEEP), ``metric``, ``trainable_params``, ``step_time_s``,
  ``peak_memory_mb``), ``pending`` (names of points not finished yet), ``summary`` (per K_t: ``mean``,
  ``sd`` (sample SD over seeds, null for one seed), ``n``; keyed ``"<k_t>"``, or ``"<k_t>@<prior>"``
  when several prior-layer choices are swept), ``baselines`` (the same per baseline method, named
  ``full + upernet`` etc. when ``--head upernet`` applies to it),
  ``pooled_sd`` (the seed SD pooled over K_t) and ``best_k_t`` (the highest mean; ties go to the
  smaller, cheaper K_t).

Order: all points of the first seed (K_t ascending, then the baselines), then the next seed, so a
stopped sweep already holds complete one-seed curves. Resume: running the same sweep again skips
every point whose ``eval.json`` exists and whose ``config.json`` matches the point's options,
continues a half-finished point from its ``last.pt`` (bit-exactly, the trainer's ``--resume``), and
starts the others; a finished point with other options is an error, never silently reused.

Under ``torchrun`` every point is trained with DDP over all the processes, one point after another
(the trainer's own distributed path), so each point equals ``torchrun ... cka-split train`` with the
same options and its step time and memory are those of such a run; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from vitsplit.backbones import Backbone, create_vit, resolve_name
from vitsplit.engine import TrainConfig, resolve_config, split_from_recommendation, train
from vitsplit.engine.config import RESUME_FREE, check_pretrained_lr_scale, with_implicit_options
from vitsplit.engine.distributed import Dist, init_distributed
from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write_json, read_json
from vitsplit.model.configs import LAYER_DECAY_METHODS, METHODS, UPERNET_METHODS
from vitsplit.progress import NULL_PROGRESS, Progress
from vitsplit.ranges import COUNT
from vitsplit.runlock import RunLock

# The main metric of each task as eval.json names it, and whether larger is better: segmentation
# mIoU (%), depth delta < 1.25 (%, "delta1"), detection box mAP (%).
METRICS: dict[str, tuple[str, bool]] = {"seg": ("mIoU", True), "depth": ("delta1", True), "det": ("bbox_mAP", True)}
# Options a point sets itself; a finished point's config.json is compared on every other option.
POINT_FIELDS = ("method", "head", "k_t", "prior_layers", "seed", "out", "split_source", "auto_split")


def parse_k_t(spec: str, num_layers: int) -> list[int]:
    """``"1-11"``, ``"1,2,3,4,6,8,11"``, ``"1-4,6,8"`` or ``"all"`` (1..L-1) -> sorted distinct K_t values.

    K_t copies the last K_t of the ``num_layers`` blocks into the task head; 1 <= K_t <= L-1 (K_t = L
    would leave no block shared with the prior head's frozen backbone)."""
    text = spec.replace(" ", "")
    hint = (
        f"--k-t takes K_t values from 1 to {num_layers - 1} ({num_layers} blocks): "
        f"e.g. 1-{num_layers - 1}, 1,2,4,8 or all"
    )
    if text == "all":
        return list(range(1, num_layers))
    values: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if dash else (int(part), int(part))
        except ValueError:
            raise UserError(f"{hint}; '{spec}' is not such a list") from None
        if a > b:
            raise UserError(f"{hint}; the range {part} is empty")
        values.update(range(a, b + 1))
    bad = sorted(k for k in values if not 1 <= k <= num_layers - 1)
    if not values or bad:
        raise UserError(f"{hint}; '{spec}' " + (f"includes {bad[0]}" if bad else "lists none"))
    return sorted(values)


def num_layers_of(model: str) -> int:
    """Blocks of the named backbone (its architecture built on the meta device: no weights, no memory)."""
    with torch.device("meta"):
        return len(create_vit(resolve_name(model)).blocks)


def stats(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "sd" (sample SD, ddof 1; None for one value), "n"}."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def pooled_sd(groups: Sequence[dict[str, Any]]) -> float | None:
    """The within-group SD pooled over groups: sqrt(sum (n_i - 1) sd_i^2 / sum (n_i - 1)); None
    without a group of two or more."""
    df = sum(g["n"] - 1 for g in groups if g["sd"] is not None)
    return math.sqrt(sum((g["n"] - 1) * g["sd"] ** 2 for g in groups if g["sd"] is not None) / df) if df else None


# When is a picked K_t "as good as the sweep's best"? Within max(TIE_POINTS metric points, TIE_SDS pooled
# seed SDs) of the best mean: two SDs is what seed noise alone reaches about 5 % of the time for a single
# comparison; the point floor keeps a sweep with a tiny seed SD from calling a 0.3-point gap a loss.
TIE_POINTS, TIE_SDS = 1.0, 2.0


def tie_tolerance(pooled: float | None) -> float:
    """The largest shortfall from the best mean still counted as a tie (see TIE_POINTS, TIE_SDS)."""
    return max(TIE_POINTS, TIE_SDS * pooled) if pooled else TIE_POINTS


@dataclass(frozen=True)
class SweepPoint:
    """One training run of the sweep."""

    method: str
    seed: int
    k_t: int | None = None
    prior_layers: tuple[int, ...] | None = None  # None: the sweep's base (the analysis's, else the published rule)
    prior_tag: bool = False  # name the prior layers in the directory (several explicit choices)

    @property
    def name(self) -> str:
        if self.method != "vitsplit":
            return f"{self.method}-s{self.seed}"
        tag = f"-p{'.'.join(map(str, self.prior_layers))}" if self.prior_tag and self.prior_layers else ""
        return f"kt{self.k_t:02d}{tag}-s{self.seed}"

    def config(self, base: TrainConfig, out: Path) -> TrainConfig:
        """The point's training options: the base's, with this method, K_t, prior layers and seed;
        ``--head`` applies to the methods that take it (``UPERNET_METHODS``), the others keep their linear head."""
        prior = (
            list(self.prior_layers) if self.prior_layers is not None else base.prior_layers
        )  # base's: the analysis's
        head = base.head if self.method in UPERNET_METHODS else "linear"
        return dataclasses.replace(
            base,
            method=self.method,
            head=head,
            seed=self.seed,
            k_t=self.k_t,
            out=str(out / self.name),
            prior_layers=prior if self.method == "vitsplit" else None,
            auto_split=None,
            split_source=None,
            resume=False,
            pretrained_lr_scale=None if self.method in LAYER_DECAY_METHODS else base.pretrained_lr_scale,
        )


@dataclass
class SweepConfig:
    """A sweep: ``base`` holds the options every point shares (a :class:`TrainConfig`; its ``seed`` is
    the first seed, ``seeds`` seeds from there); ``k_t`` the ViT-Split K_t values; ``prior_layers``
    the prior-layer choices (empty: the default); ``methods`` vitsplit and/or baselines; ``analysis``
    an analysis run to link (``base.auto_split`` also takes model, weights and prior layers from it)."""

    base: TrainConfig
    k_t: str | list[int] = field(default_factory=list)  # a list, or parse_k_t's text ("1-11", "all", ...)
    seeds: int = 1
    prior_layers: list[list[int]] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["vitsplit"])
    out: str = "runs/sweep"
    analysis: str | None = None

    def plan(self) -> list[SweepPoint]:
        priors = [tuple(p) for p in self.prior_layers] or [None]
        pts = []
        for s in range(self.base.seed, self.base.seed + self.seeds):
            if "vitsplit" in self.methods:
                pts += [
                    SweepPoint("vitsplit", s, k, p, prior_tag=bool(self.prior_layers)) for k in self.k_t for p in priors
                ]
            pts += [SweepPoint(m, s) for m in self.methods if m != "vitsplit"]
        return pts


def _check_methods(methods: list[str]) -> None:
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method '{m}': use {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UserError(f"--method lists a method twice: {' '.join(methods)}")


def resolve_sweep(cfg: SweepConfig, backbone: Backbone | None = None) -> tuple[SweepConfig, int, dict[str, Any]]:
    """Validate and fill a sweep before any training: (resolved config, blocks L, link info).

    ``link``: {"analysis": resolved analysis run or None, "picks": {"cka": K_t, "rgn": K_t}}."""
    cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base), prior_layers=[list(p) for p in cfg.prior_layers])
    _check_methods(cfg.methods)
    COUNT.check("--seeds", cfg.seeds)
    b = cfg.base
    for m in cfg.methods:  # before the base is resolved: resolving gives every other method the default scale
        check_pretrained_lr_scale(m, b.pretrained_lr_scale)
    if backbone is not None:
        b.model, b.weights = backbone.name, b.weights or "given"
    link: dict[str, Any] = {"analysis": None, "picks": {}}
    run = cfg.analysis or b.auto_split
    if run is not None:
        k_cka, prior, model, weights, source = split_from_recommendation(run, b.task, runs_dir=Path(cfg.out).parent)
        rec = read_json(source)
        rgn = (rec.get("per_task", {}).get(b.task) or {}).get("rgn") or {}
        link = {"analysis": str(Path(source).parent), "picks": {"cka": k_cka, "rgn": rgn.get("k_t")}}
        if b.auto_split is not None:  # take model, weights and prior layers from the analysis (explicit ones win)
            b.model, b.weights = b.model or model, b.weights or weights
            b.prior_layers = b.prior_layers or prior  # every point's, unless --prior-layers choices are given
    b.auto_split = None
    head = b.head
    b = resolve_config(
        dataclasses.replace(b, head="linear")
    )  # the base is a ViT-Split config; --head is the baselines'
    b.head = head
    for m in cfg.methods:
        if m in UPERNET_METHODS:
            resolve_config(
                dataclasses.replace(
                    b,
                    method=m,
                    k_t=None,
                    prior_layers=None,  # refuse a head it cannot take
                    pretrained_lr_scale=None if m in LAYER_DECAY_METHODS else b.pretrained_lr_scale,
                )
            )
    cfg.base = b
    L = backbone.num_layers if backbone is not None else num_layers_of(b.model)
    if isinstance(cfg.k_t, str):
        cfg.k_t = parse_k_t(cfg.k_t, L)
    if "vitsplit" in cfg.methods and not cfg.k_t:
        raise UserError(f"give the K_t values to sweep with --k-t (e.g. 1-{L - 1}, 1,2,4,8 or all)")
    bad = [k for k in cfg.k_t if not 1 <= k <= L - 1]
    if bad:
        raise UserError(f"K_t {bad[0]} is outside 1..{L - 1} for {b.model} ({L} blocks)")
    for p in cfg.prior_layers:
        if not p or any(not 0 <= i <= L - 1 for i in p):
            raise UserError(
                f"--prior-layers {','.join(map(str, p)) or '(empty)'}: give block indices from 0 to {L - 1}"
            )
    return cfg, L, link


def point_status(cfg: TrainConfig) -> str:
    """ "done" (eval.json and a matching config.json), "resume" (a last.pt to continue) or "new"."""
    out = Path(cfg.out)
    if not (out / "eval.json").is_file():
        return "resume" if (out / "last.pt").is_file() else "new"
    saved = with_implicit_options(read_json(out / "config.json")) if (out / "config.json").is_file() else {}
    want = resolve_config(cfg).to_dict()
    for k, v in want.items():
        if k in RESUME_FREE or k in ("split_source", "auto_split") or v is None:
            continue
        if saved.get(k) != v:
            raise UserError(
                f"{out} holds a finished run with other options ({k} was {saved.get(k)!r}, the sweep asks "
                f"for {v!r}); give the sweep another --out or remove that directory"
            )
    return "done"


def point_record(point: SweepPoint, run: Path, sweep_dir: Path, metric: str) -> dict[str, Any]:
    """sweep.json's entry of a finished point, read from its run directory."""
    ev, conf = read_json(run / "eval.json"), read_json(run / "config.json")
    value = ev.get(metric)
    return {
        "name": point.name,
        "k_t": conf.get("k_t") if point.method == "vitsplit" else None,
        "prior_layers": conf.get("prior_layers") if point.method == "vitsplit" else None,
        "method": point.method,
        "head": conf.get("head") or "linear",
        "seed": point.seed,
        "run": str(run.relative_to(sweep_dir)),
        "metric": float(value) if isinstance(value, (int, float)) else None,
        "trainable_params": conf.get("trainable_params"),
        "step_time_s": ev.get("step_time_s"),
        "peak_memory_mb": ev.get("peak_memory_mb"),
    }


def summarize(points: list[dict[str, Any]], higher_is_better: bool = True) -> dict[str, Any]:
    """``summary`` (per K_t, or per K_t@prior when the points have several prior choices), ``baselines``,
    ``pooled_sd`` and ``best_k_t`` of finished points (those with a metric)."""
    vs = [p for p in points if p["method"] == "vitsplit" and p["metric"] is not None]
    several = len({tuple(p["prior_layers"] or ()) for p in vs}) > 1
    groups: dict[str, list[float]] = {}
    keys: dict[str, tuple[int, tuple[int, ...]]] = {}
    for p in sorted(vs, key=lambda p: (p["k_t"], p["prior_layers"] or [])):
        key = f"{p['k_t']}@{','.join(map(str, p['prior_layers']))}" if several else str(p["k_t"])
        groups.setdefault(key, []).append(p["metric"])
        keys[key] = (p["k_t"], tuple(p["prior_layers"] or ()))
    summary = {k: stats(v) for k, v in groups.items()}
    base: dict[str, list[float]] = {}
    for p in points:
        if p["method"] != "vitsplit" and p["metric"] is not None:
            head = p.get("head") or "linear"
            base.setdefault(p["method"] + (f" + {head}" if head != "linear" else ""), []).append(p["metric"])
    best = None
    if summary:
        sign = 1 if higher_is_better else -1
        best_key = max(summary, key=lambda k: (sign * summary[k]["mean"], -keys[k][0]))
        best = keys[best_key][0]
    return {
        "summary": summary,
        "baselines": {m: stats(v) for m, v in base.items()},
        "pooled_sd": pooled_sd(list(summary.values())),
        "best_k_t": best,
    }


def sweep_json(
    cfg: SweepConfig, link: dict[str, Any], points: list[dict[str, Any]], pending: list[str]
) -> dict[str, Any]:
    metric, higher = METRICS[cfg.base.task]
    shared = {k: v for k, v in cfg.base.to_dict().items() if k not in POINT_FIELDS and k not in RESUME_FREE}
    grid = {
        "k_t": cfg.k_t,
        "seeds": list(range(cfg.base.seed, cfg.base.seed + cfg.seeds)),
        "methods": cfg.methods,
        "prior_layers": cfg.prior_layers or None,
    }
    return {
        "task": cfg.base.task,
        "metric": metric,
        "higher_is_better": higher,
        **link,
        "config": {"train": shared, **grid},
        "points": points,
        "pending": pending,
        **summarize(points, higher),
    }


def run_sweep(
    cfg: SweepConfig, progress: Progress = NULL_PROGRESS, *, backbone: Backbone | None = None
) -> dict[str, Any]:
    """Train every point of ``cfg`` that is not finished (module docstring); write SWEEP/sweep.json.

    ``backbone``: train every point on this backbone (API use and tests; as for ``train``).
    Returns sweep.json's content plus ``"ran"`` ({point name: "done" (skipped) | "resume" | "new"})
    and ``"stopped"`` (True when ``base.max_steps_this_run`` stopped a point before its end)."""
    d = init_distributed(cfg.base.device)
    try:
        # rank 0 owns SWEEP for the whole sweep (each point's train() owns its own run directory)
        with RunLock(cfg.out) if d.main else contextlib.nullcontext() as lock:
            if lock is not None and lock.took_over():
                progress.log(lock.took_over())
            return _sweep_locked(cfg, d, progress, backbone)
    finally:
        if d.created:
            torch.distributed.destroy_process_group()


def _sweep_locked(cfg: SweepConfig, d: Dist, progress: Progress, backbone: Backbone | None) -> dict[str, Any]:
    cfg, _, link = resolve_sweep(cfg, backbone)
    out = Path(cfg.out)
    metric = METRICS[cfg.base.task][0]
    plan = cfg.plan()
    records: dict[str, dict[str, Any]] = {}
    ran: dict[str, str] = {}
    stopped = False
    status = {p.name: point_status(p.config(cfg.base, out)) for p in plan}
    done0 = sum(s == "done" for s in status.values())
    progress.log(
        f"sweep of {len(plan)} points in {out}: {done0} finished, "
        f"{sum(s == 'resume' for s in status.values())} to resume, {sum(s == 'new' for s in status.values())} to start"
    )
    bar = progress.task(f"sweep {cfg.base.task}", len(plan), completed=done0)
    times: list[float] = []
    try:
        for i, p in enumerate(plan):
            run = out / p.name
            ran[p.name] = status[p.name]
            if status[p.name] != "done":
                t0 = time.perf_counter()
                pc = dataclasses.replace(p.config(cfg.base, out), resume=status[p.name] == "resume")
                result = train(pc, progress, backbone=backbone)
                if "stopped_at" in result:
                    stopped = True
                    break
                times.append(time.perf_counter() - t0)
                left = sum(status[q.name] != "done" for q in plan[i + 1 :]) * sum(times) / len(times)
                bar.advance(1, point=p.name, left=f"{left / 60:.1f} min")
            if d.main:
                records[p.name] = point_record(p, run, out, metric)
                pending = [q.name for q in plan if q.name not in records]
                atomic_write_json(out / "sweep.json", sweep_json(cfg, link, list(records.values()), pending))
            d.barrier()
    finally:
        bar.close()
    pending = [q.name for q in plan if q.name not in records]
    return {**sweep_json(cfg, link, list(records.values()), pending), "ran": ran, "stopped": stopped}
