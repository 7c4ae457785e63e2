"""Does K_t matter in the demo's world? ViT-Split trained at every K_t, several seeds, same budget.

For each K_t (default 1 .. L-1) and seed (default 0, 1, 2) this trains ViT-Split for seg on the
demo's data with the demo's full training budget (``cka_split.pipelines.demo.FULL_PLAN``: iterations, batch,
crop, learning rate, data sizes) and the default prior layers (2, 5, 8, 11 for 12 blocks), then prints:

- mIoU mean and SD (over seeds) and trainable parameters per K_t;
- the pooled seed SD, sqrt(sum_k (n_k - 1) s_k^2 / sum_k (n_k - 1));
- the spread of the K_t means (best - worst) in pooled SDs;
- a one-way ANOVA across K_t (scipy.stats.f_oneway: F and p), and the two-way ANOVA with the seed as
  block (:func:`block_anova`: every K_t of one seed sees the same scenes in the same order);
- the best K_t (highest mean) and the saturation point: the smallest K_t whose mean is within two
  pooled SDs of the best mean;
- the best constant predictor's mIoU on the same validation scenes (every pixel one class; the most
  frequent class, background, is best; averaged over the seeds, whose runs each draw their own
  validation scenes), so that the headroom above it is visible.

Every run is an ordinary training run directory under ``--out`` (``k{K_t}_s{seed}``); a run whose
``eval.json`` exists is read, not retrained, so a stopped benchmark continues where it stopped.
The summary is also written to ``OUT/kt_effect.json``.

    python benchmarks/kt_effect.py                      # the full protocol (3 seeds x 11 K_t: hours on 2 cores)
    python benchmarks/kt_effect.py --quick              # a smoke test: K_t 1, 6, 11, two seeds, a few steps
    python benchmarks/kt_effect.py --k-t 1,3,6,11 --seeds 0,1,2 --out runs/kt

Measure on a quiet machine (nothing else running): the runs share the CPU with nothing, and the
per-run seconds printed are then meaningful.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cka_split.pipelines.demo import FULL_PLAN, DemoPlan
from vitsplit.backbones import build_backbone
from vitsplit.data import build_dataset
from vitsplit.engine import TrainConfig, train
from vitsplit.evaluation import IoUMetric
from vitsplit.model import default_split
from vitsplit.model.configs import PRETRAINED_LR_SCALE

QUICK = dict(train_iters=4, train_length=32, val_length=8, train_batch_size=4)


def parse_list(text: str, last: int) -> list[int]:
    """ "all" -> 1..last; "a-b" -> a..b; "a,b,c" -> those (each may be a range)."""
    if text == "all":
        return list(range(1, last + 1))
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def constant_miou(data: str, plan: DemoPlan, seed: int) -> float:
    """mIoU (%) of the best constant prediction on the validation scenes of ``seed`` (a training run
    draws its validation scenes with its own seed): each class c predicted everywhere scores
    area_c / total on class c and 0 on the others; the best c is kept."""
    ds = build_dataset(data, "val", task="seg", crop=plan.image_size, length=plan.val_length, seed=seed)
    best = 0.0
    labels = [ds[i]["seg"] for i in range(len(ds))]
    for c in range(ds.num_classes):
        metric = IoUMetric(ds.num_classes)
        for label in labels:
            metric.update(label.new_full(label.shape, c), label)
        best = max(best, float(metric.compute()["mIoU"]))
    return best


def statistics(scores: dict[int, list[float]], higher_is_better: bool = True) -> dict[str, object]:
    """Per-K_t mean/SD, pooled SD, spread in pooled SDs, one-way ANOVA, best and saturation K_t (the
    smallest K_t whose mean is within two pooled SDs of the best; "best" and "within" follow the metric's
    direction)."""
    from scipy.stats import f_oneway

    ks = sorted(scores)
    means = {k: float(np.mean(scores[k])) for k in ks}
    sds = {k: float(np.std(scores[k], ddof=1)) if len(scores[k]) > 1 else float("nan") for k in ks}
    dof = sum(len(scores[k]) - 1 for k in ks)
    pooled = (
        math.sqrt(sum((len(scores[k]) - 1) * sds[k] ** 2 for k in ks if len(scores[k]) > 1) / dof)
        if dof
        else float("nan")
    )
    sign = 1.0 if higher_is_better else -1.0
    best = max(ks, key=lambda k: (sign * means[k], -k))
    saturation = min(k for k in ks if sign * (means[best] - means[k]) <= 2 * pooled) if dof else best
    anova = f_oneway(*[scores[k] for k in ks]) if dof and len(ks) > 1 else None
    spread = max(means.values()) - min(means.values())
    return {
        "k_t": ks,
        "mean": means,
        "sd": sds,
        "n": {k: len(scores[k]) for k in ks},
        "pooled_sd": pooled,
        "spread": spread,
        "spread_over_pooled_sd": spread / pooled if pooled else float("nan"),
        "anova_F": float(anova.statistic) if anova is not None else None,
        "anova_p": float(anova.pvalue) if anova is not None else None,
        "best_k_t": best,
        "saturation_k_t": saturation,
    }


def block_anova(table: dict[int, dict[int, float]]) -> dict[str, float | int | None]:
    """Two-way ANOVA without replication, K_t x seed, seed as the block (randomised complete blocks):
    a seed fixes the training scenes, their order and the validation scenes for every K_t, so a seed's
    runs share an offset that the one-way ANOVA counts as noise. Only seeds present at every K_t are
    used. Returns F and p for K_t, the residual SD (the run-to-run noise once the seed offset is
    removed) and the seeds used; None values with fewer than 2 K_t or 2 complete seeds."""
    from scipy.stats import f as f_dist

    ks = sorted(table)
    seeds = sorted(set.intersection(*(set(table[k]) for k in ks))) if ks else []
    if len(ks) < 2 or len(seeds) < 2:
        return {"F": None, "p": None, "residual_sd": None, "seeds": len(seeds)}
    y = np.array([[table[k][s] for s in seeds] for k in ks])  # (K, S)
    grand = y.mean()
    ss_k = len(seeds) * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_s = len(ks) * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_res = ((y - grand) ** 2).sum() - ss_k - ss_s
    df_k, df_res = len(ks) - 1, (len(ks) - 1) * (len(seeds) - 1)
    ms_res = ss_res / df_res
    F = (ss_k / df_k) / ms_res if ms_res > 0 else float("inf")
    return {
        "F": float(F),
        "p": float(f_dist.sf(F, df_k, df_res)),
        "residual_sd": float(math.sqrt(max(ms_res, 0.0))),
        "seeds": len(seeds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-vit")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--data", default=None, help="default: the demo's data (cka_split.pipelines.demo.DEMO_DATA)")
    ap.add_argument("--k-t", default="all", help="'all' (1..L-1), a range '1-11' or a list '1,3,6,11'")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=None, help="default: the full demo's training iterations")
    ap.add_argument(
        "--pretrained-lr-scale",
        type=float,
        default=None,
        help="the task head's lr multiplier (default: the demo's, cka_split.pipelines.demo.FULL_PLAN)",
    )
    ap.add_argument("--out", default="runs/kt_effect")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: K_t 1, 6, 11 (or 1, L/2, L-1), seeds 0 and 1, {QUICK['train_iters']} steps",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--sweep",
        default=None,
        help="train nothing: read a finished sweep's sweep.json (a folder), e.g. "
        "split_validation's first setting, and print its table",
    )
    args = ap.parse_args()
    if args.sweep:
        return from_sweep(Path(args.sweep))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    plan = replace(FULL_PLAN, **QUICK) if args.quick else FULL_PLAN
    if args.iters:
        plan = replace(plan, train_iters=args.iters)
    if args.pretrained_lr_scale is not None:
        plan = replace(plan, train_pretrained_lr_scale=args.pretrained_lr_scale)
    data = args.data or plan.data
    backbone = build_backbone(args.model, args.weights)
    L = backbone.num_layers
    _, prior_layers, _ = default_split(L)
    k_ts = [1, L // 2, L - 1] if args.quick and args.k_t == "all" else parse_list(args.k_t, L - 1)
    seeds = [0, 1] if args.quick and args.seeds == "0,1,2" else parse_list(args.seeds, 0)
    out = Path(args.out)
    print(f"backbone {backbone.weights_source}")
    print(
        f"data {data}; {plan.train_iters} iterations of batch {plan.train_batch_size} at {plan.image_size} px, "
        f"lr {plan.train_lr} (task head x {plan.train_pretrained_lr_scale}); prior layers {prior_layers}; K_t {k_ts}; "
        f"seeds {seeds}"
    )

    table: dict[int, dict[int, float]] = {}  # K_t -> seed -> mIoU
    params: dict[int, int] = {}
    for k in k_ts:
        for seed in seeds:
            run = out / f"k{k}_s{seed}"
            t = time.time()
            if (run / "eval.json").is_file():
                metrics = json.loads((run / "eval.json").read_text())
                how = "read"
            else:
                cfg = TrainConfig(
                    task="seg",
                    method="vitsplit",
                    model=args.model,
                    weights=args.weights,
                    data=data,
                    k_t=k,
                    prior_layers=list(prior_layers),
                    iters=plan.train_iters,
                    batch_size=plan.train_batch_size,
                    crop=plan.image_size,
                    lr=plan.train_lr,
                    seed=seed,
                    pretrained_lr_scale=plan.train_pretrained_lr_scale,
                    checkpoint_every=plan.train_iters,
                    log_every=max(1, plan.train_iters // 10),
                    out=str(run),
                    device="cpu",
                    train_length=plan.train_length,
                    val_length=plan.val_length,
                )
                metrics = train(cfg, backbone=backbone)
                how = "trained"
            params[k] = json.loads((run / "config.json").read_text())["trainable_params"]
            table.setdefault(k, {})[seed] = float(metrics["mIoU"])
            print(f"K_t {k:2d} seed {seed}: mIoU {metrics['mIoU']:.2f} ({how}, {time.time() - t:.0f} s)", flush=True)

    const = float(np.mean([constant_miou(data, plan, seed) for seed in seeds]))
    summary = print_summary(params, const, {}, table)
    summary.update({"data": data, "plan": plan.__dict__, "weights_source": backbone.weights_source})
    out.mkdir(parents=True, exist_ok=True)
    (out / "kt_effect.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def from_sweep(folder: Path) -> None:
    """The same table from a sweep's points (seg sweeps: the constant predictor on each seed's scenes)."""
    sweep = json.loads((folder / "sweep.json").read_text())
    train_cfg = sweep["config"]["train"]
    table: dict[int, dict[int, float]] = {}  # K_t -> seed -> metric
    params: dict[int, int] = {}
    baselines: dict[str, list[float]] = {}
    for p in sweep["points"]:
        if p["metric"] is None:
            continue
        if p["method"] == "vitsplit":
            table.setdefault(int(p["k_t"]), {})[int(p["seed"])] = float(p["metric"])
            params[int(p["k_t"])] = p["trainable_params"]
        else:
            baselines.setdefault(f"{p['method']} ({p['trainable_params'] / 1e6:.2f}M)", []).append(float(p["metric"]))
    print(
        f"sweep {folder}: {sweep['task']} {sweep['metric']} on {train_cfg['data']}; {train_cfg['iters']} iterations of "
        f"batch {train_cfg['batch_size']} at {train_cfg['crop']} px, lr {train_cfg['lr']} (task head and full FT's "
        f"backbone x {train_cfg.get('pretrained_lr_scale') or PRETRAINED_LR_SCALE})"
    )
    const = None
    if sweep["task"] == "seg":
        plan = replace(FULL_PLAN, image_size=train_cfg["crop"], val_length=train_cfg["val_length"])
        seeds = sorted({p["seed"] for p in sweep["points"]})
        const = float(np.mean([constant_miou(train_cfg["data"], plan, seed) for seed in seeds]))
    summary = print_summary(params, const, baselines, table, sweep.get("higher_is_better", True))
    (folder / "kt_effect.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def print_summary(
    params: dict[int, int],
    const: float | None,
    baselines: dict[str, list[float]],
    table: dict[int, dict[int, float]],
    higher_is_better: bool = True,
) -> dict[str, object]:
    """Print and return the K_t-effect table of ``table`` (K_t -> seed -> metric)."""
    scores = {k: list(v.values()) for k, v in table.items()}
    stats = statistics(scores, higher_is_better)
    blocked = block_anova(table)
    k_ts = sorted(scores)
    print()
    print(f"{'K_t':>4} {'mean':>7} {'SD':>6} {'n':>2} {'params':>9}")
    for k in k_ts:
        print(f"{k:>4} {stats['mean'][k]:7.2f} {stats['sd'][k]:6.2f} {stats['n'][k]:>2} {params[k] / 1e6:8.2f}M")
    print(
        f"pooled seed SD {stats['pooled_sd']:.2f}; spread of means {stats['spread']:.2f} "
        f"= {stats['spread_over_pooled_sd']:.1f} pooled SD"
    )
    if stats["anova_p"] is not None:
        print(f"one-way ANOVA across K_t: F {stats['anova_F']:.2f}, p {stats['anova_p']:.2g}")
    print(
        f"best K_t {stats['best_k_t']} (mean {stats['mean'][stats['best_k_t']]:.2f}); saturation (smallest K_t within "
        f"2 pooled SD of the best) {stats['saturation_k_t']}"
    )
    if blocked["p"] is not None:
        print(
            f"two-way ANOVA, seed as block ({blocked['seeds']} seeds): F {blocked['F']:.2f}, p {blocked['p']:.2g}; "
            f"residual SD {blocked['residual_sd']:.2f} (the seed-to-seed noise once each seed's offset is removed)"
        )
    for name, v in baselines.items():
        print(f"{name}: mean {np.mean(v):.2f}, SD {np.std(v, ddof=1) if len(v) > 1 else float('nan'):.2f}, n {len(v)}")
    if const is not None:
        print(
            f"best constant predictor mIoU {const:.2f}; best mean - constant "
            f"{stats['mean'][stats['best_k_t']] - const:.2f}"
        )
    return {
        "scores": scores,
        "trainable_params": params,
        "constant_mIoU": const,
        "baselines": baselines,
        **stats,
        "block_anova": blocked,
    }


if __name__ == "__main__":
    main()
