"""Is the recommended K_t a good K_t? The split-validation protocol: the CKA pick and the RGN pick against
the best K_t of a sweep that trains ViT-Split at every K_t, per setting.

Per setting (one task on one dataset, one backbone):

1. ``analyze`` (timed, ``--selector both``): the task copy's fine-tuning and CKA give the CKA pick; Auto-RGN
   (``cka_split.probes.rgn``, Lee et al., ICLR 2023) on a few batches gives the RGN pick; each one's seconds.
2. ``sweep`` (timed, linked to the analysis): ViT-Split at K_t values that span 1..L-1 (at least
   ``MIN_K_T`` of them, both picks always included), ``--seeds`` seeds each (>= 3 for the real protocol).
3. One row: the best K_t (the highest mean over seeds; ties to the smaller), each pick's mean minus the
   best's with the pooled seed SD, whether that is within the issue's target max(``TIE_POINTS``
   point, ``TIE_SDS`` pooled SD) (``vitsplit.sweep.grid.tie_tolerance``), the analysis cost (copies' fine-tuning + CKA)
   and the RGN cost as a
   fraction of one full one-seed sweep of K_t 1..L-1 (estimated from the measured points' training
   seconds, step time x iterations, interpolated linearly in K_t; evaluation time is left out, which
   makes the fractions conservative).

Settings (``--setting TASK=SPEC``, repeatable): by default the embedded world, the demo backbone on the
demo's scenes (zoom 2, trained at the drawn scale): seg and depth on the demo's 4 classes (tuning), seg
on 3 and on 2 classes (held out). The first ``--full-grid`` settings (default 1: the demo's own seg task) sweep every
K_t in 1..L-1
and train the linear and full fine-tuning baselines at the same budget: that sweep is also the embedded
world's K_t-effect benchmark (``benchmarks/kt_effect.py --sweep DIR`` prints its ANOVA table); every row
carries the same K_t-effect statistics (one-way ANOVA across K_t, saturation point). The first half of the settings (in
the order given)
is where a rule's constants may be chosen and tuned ("tuning"); the rest are reported as held out.
Detection is left out on CPU: one Mask R-CNN training run costs minutes per hundred steps on 2 cores
(the demo's 60 copy steps take about three minutes), so a sweep of 18+ runs per setting does not fit;
on a GPU, add ``--setting det=coco:ANN.json:IMG``. Metrics: seg mIoU, depth delta < 1.25 in %.

Usage::

    python benchmarks/split_validation.py --out runs/split_validation   # the embedded world (~100 min, 2 cores)
    python benchmarks/split_validation.py --quick --out /tmp/sv         # smoke test, random weights: the numbers mean
    nothing
    python benchmarks/split_validation.py --model dinov2_vits14 --weights auto --setting seg=ade20k:/data/ade \\
        --image-size 224 --crop 512 --iters 8000 --batch-size 16 --device cuda --out runs/sv-dinov2

Rerunning the same command resumes: finished analyses are reused, sweeps skip finished points. ``--only I``
runs setting I alone (names and roles stay those of the whole list), so two processes of one thread each
can share two cores (``--threads 1 --only 0`` and ``--threads 1 --only 2``, ...); the command without
``--only`` then reads every finished setting and prints the table.
Writes OUT/split_validation.json (rows, machine, command) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cka_split.pipelines.analyze import AnalyzeConfig, run_analyze, save_backbone
from cka_split.pipelines.demo import DEMO_DATA, FULL_PLAN
from vitsplit.backbones import build_backbone
from vitsplit.engine import TrainConfig
from vitsplit.sweep.grid import TIE_POINTS, TIE_SDS, SweepConfig, num_layers_of, run_sweep, tie_tolerance

MIN_K_T = 6  # K_t values per sweep (the issue's protocol), both picks added
TARGET_COST = 0.2  # the issue's target: analysis cost <= 0.2 of one full one-seed sweep
THREE_CLASSES = DEMO_DATA.replace("classes=4", "classes=3")
TWO_CLASSES = DEMO_DATA.replace("classes=4", "classes=2")
# depth is a tuning setting only: measured, the depth head does not learn the scenes' depth in the demo's
# 150 steps (delta < 1.25 about 4 % at every K_t: its log-depth starts at 0 = 1 m against scenes at
# 2.5-14.5 m, and the scale-invariant loss pulls the global scale slowly), so both held-out settings are seg
DEFAULT_SETTINGS = [f"seg={DEMO_DATA}", f"depth={DEMO_DATA}", f"seg={THREE_CLASSES}", f"seg={TWO_CLASSES}"]
FULL_GRID_BASELINES = ["linear", "full"]  # trained beside ViT-Split in the --full-grid settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the K_t-effect statistics: one definition, in kt_effect.py
from kt_effect import block_anova, statistics  # noqa: E402


def k_t_grid(num_layers: int, picks: list[int], n: int = MIN_K_T) -> list[int]:
    """``n`` K_t values spread evenly over 1..L-1 (both ends included), plus the picks."""
    spread = {int(round(x)) for x in np.linspace(1, num_layers - 1, min(n, num_layers - 1))}
    return sorted(spread | {int(k) for k in picks})


def full_sweep_seconds(sweep: dict[str, Any], num_layers: int) -> float | None:
    """One-seed training seconds of every K_t in 1..L-1: the first seed's points' step time x iterations,
    linear in K_t between them (constant beyond the measured range)."""
    iters = sweep["config"]["train"]["iters"]
    first = min(p["seed"] for p in sweep["points"]) if sweep["points"] else None
    pts = sorted(
        (p["k_t"], p["step_time_s"] * iters)
        for p in sweep["points"]
        if p["method"] == "vitsplit" and p["seed"] == first and p.get("step_time_s")
    )
    if not pts:
        return None
    ks, secs = zip(*pts)
    return float(np.interp(np.arange(1, num_layers), ks, secs).sum())


def pick_row(sweep: dict[str, Any], k: int | None) -> dict[str, Any]:
    """A pick against the sweep's best: its mean, the difference (pick - best), in pooled SDs, within target."""
    summary, best, pooled = sweep["summary"], sweep["best_k_t"], sweep["pooled_sd"]
    if k is None or str(k) not in summary or best is None:
        return {"k_t": k, "mean": None, "minus_best": None, "in_sd": None, "within_target": None}
    diff = summary[str(k)]["mean"] - summary[str(best)]["mean"]
    if not sweep.get("higher_is_better", True):
        diff = -diff
    tol = tie_tolerance(pooled)
    return {
        "k_t": k,
        "mean": summary[str(k)]["mean"],
        "minus_best": diff,
        "in_sd": diff / pooled if pooled else None,
        "within_target": bool(-diff <= tol),
    }


def validation_row(
    name: str,
    role: str,
    sweep: dict[str, Any],
    rec_task: dict[str, Any],
    analyze_seconds: float,
    num_layers: int,
    sweep_seconds: float,
) -> dict[str, Any]:
    """The benchmark's row of one setting (module docstring, step 3)."""
    rgn = rec_task.get("rgn") or {}
    rgn_s = float(rgn.get("seconds") or 0.0)
    full = full_sweep_seconds(sweep, num_layers)
    best = sweep["best_k_t"]
    return {
        "setting": name,
        "role": role,
        "task": sweep["task"],
        "metric": sweep["metric"],
        "num_layers": num_layers,
        "k_t_swept": sorted({p["k_t"] for p in sweep["points"] if p["method"] == "vitsplit"}),
        "seeds": len({p["seed"] for p in sweep["points"]}),
        "best_k_t": best,
        "best_mean": sweep["summary"][str(best)]["mean"] if best is not None else None,
        "pooled_sd": sweep["pooled_sd"],
        "cka": pick_row(sweep, rec_task.get("k_t")),
        "rgn": pick_row(sweep, rgn.get("k_t")),
        "analysis_seconds": analyze_seconds - rgn_s,
        "rgn_seconds": rgn_s,
        "sweep_seconds": sweep_seconds,
        "full_one_seed_sweep_seconds": full,
        "analysis_over_full": (analyze_seconds - rgn_s) / full if full else None,
        "rgn_over_full": rgn_s / full if full else None,
        "k_t_effect": k_t_effect(sweep),
        "baselines": sweep.get("baselines") or {},
    }


def k_t_effect(sweep: dict[str, Any]) -> dict[str, Any] | None:
    """kt_effect.statistics of the sweep's ViT-Split points (ANOVA across K_t, saturation), or None with
    fewer than two K_t or one seed."""
    table: dict[int, dict[int, float]] = {}  # K_t -> seed -> metric
    for p in sweep["points"]:
        if p["method"] == "vitsplit" and p["metric"] is not None:
            table.setdefault(int(p["k_t"]), {})[int(p["seed"])] = float(p["metric"])
    scores = {k: list(v.values()) for k, v in table.items()}
    if len(scores) < 2 or all(len(v) < 2 for v in scores.values()):
        return None
    st = statistics(scores, higher_is_better=sweep.get("higher_is_better", True))
    blocked = block_anova(table)
    return {
        **{k: st[k] for k in ("anova_F", "anova_p", "spread_over_pooled_sd", "saturation_k_t")},
        "block_anova_F": blocked["F"],
        "block_anova_p": blocked["p"],
        "residual_sd": blocked["residual_sd"],
    }


def run_setting(i: int, spec: str, args: argparse.Namespace, out: Path, role: str) -> dict[str, Any]:
    task, _, data = spec.partition("=")
    name = f"{i}-{task}-{data.replace(':', '_').replace(',', '_').replace('=', '')}"
    analysis = out / name / "analysis"
    if not (analysis / "recommendation.json").is_file():
        cfg = AnalyzeConfig(
            model=args.model,
            weights=args.weights,
            tasks=[task],
            data={"*": data},
            finetune_steps=args.finetune_steps,
            finetune_lr=args.finetune_lr,
            finetune_batch_size=args.finetune_batch_size,
            probe_images=args.probe_images,
            batch_size=args.cka_batch_size,
            image_size=args.image_size,
            device=args.device,
            seed=0,
            out=str(analysis),
            pca_images=0,
            selector="both",
            rgn_batches=args.rgn_batches,
        )
        run_analyze(cfg)
    rec = json.loads((analysis / "recommendation.json").read_text())
    analyze_seconds = float(json.loads((analysis / "config.json").read_text())["seconds"])
    rec_task = rec["per_task"][task]
    L = int(rec["num_layers"])
    picks = [k for k in (rec_task["k_t"], (rec_task.get("rgn") or {}).get("k_t")) if k is not None]
    base = TrainConfig(
        task=task,
        model=args.model,
        weights=args.weights,
        data=data,
        iters=args.iters,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        pretrained_lr_scale=args.pretrained_lr_scale,
        seed=0,
        device=args.device,
        checkpoint_every=max(1, args.iters // 2),
        log_every=max(1, args.iters // 20),
        train_length=args.train_length,
        val_length=args.val_length,
    )
    t0 = time.perf_counter()
    full_grid = i < args.full_grid
    grid = list(range(1, L)) if full_grid else k_t_grid(L, picks, args.n_k_t)
    methods = ["vitsplit", *FULL_GRID_BASELINES] if full_grid else ["vitsplit"]
    sweep = run_sweep(
        SweepConfig(
            base=base,
            k_t=grid,
            seeds=args.seeds,
            out=str(out / name / "sweep"),
            analysis=str(analysis),
            methods=methods,
        )
    )
    return validation_row(name, role, sweep, rec_task, analyze_seconds, L, time.perf_counter() - t0)


def print_table(rows: list[dict[str, Any]]) -> None:
    def pick(p):
        if p["minus_best"] is None:
            return f"{p['k_t']} (not swept)"
        sd = f" ({p['in_sd']:+.1f} SD)" if p["in_sd"] is not None else ""
        return f"{p['k_t']}: {p['minus_best']:+.2f}{sd} {'ok' if p['within_target'] else 'MISS'}"

    head = (
        f"{'setting':34} {'role':9} {'best K_t (mean)':18} {'pooled SD':9}  {'CKA pick - best':26} "
        f"{'RGN pick - best':26} {'analysis/full':13} {'RGN/full':9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        best = f"{r['best_k_t']} ({r['best_mean']:.2f})" if r["best_k_t"] is not None else "-"
        sd = f"{r['pooled_sd']:.2f}" if r["pooled_sd"] else "-"
        frac = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(
            f"{r['setting'][:34]:34} {r['role']:9} {best:18} {sd:9}  {pick(r['cka']):26} {pick(r['rgn']):26} "
            f"{frac(r['analysis_over_full']):13} {frac(r['rgn_over_full']):9}"
        )
    print(
        f"targets: a pick within max({TIE_POINTS:g} point, {TIE_SDS:g} pooled seed SD) of the best ('ok'); "
        f"analysis/full <= {TARGET_COST}. Full sweep = K_t 1..L-1 at one seed, training seconds."
    )
    print()
    print(
        f"{'setting':34} {'K_t effect: ANOVA F, p':24} {'seed-blocked F, p':20} {'spread/SD':9} {'saturation K_t':14} "
        "baselines (mean +- SD)"
    )
    for r in rows:
        e = r.get("k_t_effect")
        anova = f"F {e['anova_F']:.1f}, p {e['anova_p']:.2g}" if e and e["anova_p"] is not None else "-"
        blocked = (
            f"F {e['block_anova_F']:.1f}, p {e['block_anova_p']:.2g}"
            if e and e.get("block_anova_p") is not None
            else "-"
        )
        spread = f"{e['spread_over_pooled_sd']:.1f}" if e else "-"
        sat = str(e["saturation_k_t"]) if e else "-"
        base = (
            "; ".join(
                f"{m} {v['mean']:.2f} +- {v['sd'] if v['sd'] is not None else float('nan'):.2f}"
                for m, v in (r.get("baselines") or {}).items()
            )
            or "-"
        )
        print(f"{r['setting'][:34]:34} {anova:24} {blocked:20} {spread:9} {sat:14} {base}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    plan = FULL_PLAN
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke test: random demo-vit, tiny everything (< 2 min)")
    p.add_argument("--model", default="demo-vit")
    p.add_argument("--weights", default="auto")
    p.add_argument("--setting", action="append", help="TASK=SPEC (repeatable); default: " + " ".join(DEFAULT_SETTINGS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-k-t", type=int, default=MIN_K_T, help="K_t values spread over 1..L-1 (the picks are added)")
    p.add_argument(
        "--full-grid",
        type=int,
        default=1,
        help="the first N settings sweep every K_t and the baselines " + ", ".join(FULL_GRID_BASELINES),
    )
    p.add_argument(
        "--only",
        type=int,
        action="append",
        help="run only setting I (repeatable); the table shows the settings finished so far",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    p.add_argument("--iters", type=int, default=plan.train_iters)
    p.add_argument("--batch-size", type=int, default=plan.train_batch_size)
    p.add_argument("--crop", type=int, default=plan.image_size)
    p.add_argument("--lr", type=float, default=plan.train_lr)
    p.add_argument(
        "--pretrained-lr-scale",
        type=float,
        default=plan.train_pretrained_lr_scale,
        help="lr multiplier of the task head (and full FT's backbone); default: the demo's",
    )
    p.add_argument("--train-length", type=int, default=plan.train_length)
    p.add_argument("--val-length", type=int, default=plan.val_length)
    p.add_argument("--finetune-steps", type=int, default=plan.finetune_steps_seg)
    p.add_argument("--finetune-lr", type=float, default=plan.finetune_lr)
    p.add_argument("--finetune-batch-size", type=int, default=plan.finetune_batch_size)
    p.add_argument("--probe-images", type=int, default=plan.probe_images)
    p.add_argument("--cka-batch-size", type=int, default=plan.cka_batch_size)
    p.add_argument("--image-size", type=int, default=plan.image_size)
    p.add_argument("--rgn-batches", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/split_validation"))
    args = p.parse_args(argv)
    if args.quick:
        args.setting = args.setting or ["seg=synthetic:size=28,classes=3", "depth=synthetic:size=28,classes=3"]
        for k, v in dict(
            seeds=2,
            n_k_t=2,
            full_grid=0,
            iters=2,
            batch_size=2,
            crop=28,
            train_length=8,
            val_length=2,
            finetune_steps=2,
            finetune_batch_size=2,
            probe_images=16,
            cka_batch_size=8,
            image_size=28,
            rgn_batches=2,
        ).items():
            setattr(args, k, v)
    args.setting = args.setting or list(DEFAULT_SETTINGS)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.quick and args.weights == "auto":  # one random backbone for every run, in a file (never called pretrained)
        path = out / "random-demo-vit.safetensors"
        if not path.is_file():
            save_backbone(build_backbone(args.model, "random", seed=0), path)
        args.weights = str(path.resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg(), time.perf_counter()
    n_tune = (len(args.setting) + 1) // 2
    rows = []
    for i, spec in enumerate(args.setting):
        if args.only and i not in args.only:
            continue
        rows.append(run_setting(i, spec, args, out, "tuning" if i < n_tune else "held-out"))
        result = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "load_average_start": load0,
                "load_average_now": os.getloadavg(),
                "device": args.device,
            },
            "model": args.model,
            "weights": args.weights,
            "num_layers": num_layers_of(args.model),
            "seconds": round(time.perf_counter() - t0, 1),
            "rows": rows,
        }
        name = f"split_validation-{'-'.join(map(str, args.only))}.json" if args.only else "split_validation.json"
        (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    print(
        f"{time.perf_counter() - t0:.0f} s; load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        f"end; "
        f"wrote its json in {out}"
    )
    return rows


if __name__ == "__main__":
    main()
