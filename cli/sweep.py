"""``cka-split sweep``: ViT-Split at several K_t (and seeds, prior-layer choices), the baselines at the
same budget; every option of ``cka-split train`` applies to every point (:func:`.options.reuse_options`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from vitsplit.ranges import COUNT

from . import train as train_command
from .interrupt import Interrupted
from .options import checked, parse_layer_list, reuse_options


def _methods(items: list[str]) -> list[str]:
    return [m for item in items for m in item.replace(",", " ").split()]


@reuse_options(train_command.train, drop=("resume",))
def sweep(
    k_t: Optional[str] = typer.Option(
        None, "--k-t", help="K_t values: a range (1-11), a list (1,2,3,4,6,8,11), both (1-4,6,8) or all (1..L-1)."
    ),
    seeds: int = typer.Option(
        1,
        help="Seeds per point: --seed, --seed + 1, ... (data order, augmentation, head init).",
        callback=checked(COUNT),
    ),
    prior_layers: Optional[List[str]] = typer.Option(
        None,
        "--prior-layers",
        help="Prior-layer choice, e.g. 2,5,8,11 (repeatable: each K_t is trained with each choice; default: the "
        "published rule, or the analysis's with --auto-split).",
    ),
    method: List[str] = typer.Option(
        ["vitsplit"],
        "--method",
        help="vitsplit and/or the baselines linear, full, lora, vit-adapter, vit-comer at the same budget "
        "(repeatable or "
        "comma-separated; --head upernet applies to full, lora, vit-adapter and vit-comer).",
    ),
    auto_split: Optional[str] = typer.Option(
        None,
        "--auto-split",
        help="Take model, weights and prior layers from RUN/recommendation.json (a run dir, or 'latest') and link the "
        "sweep to RUN. Explicit options override.",
    ),
    analysis: Optional[str] = typer.Option(
        None,
        "--analysis",
        help="Link the sweep to this analysis run only (its report shows the sweep; sweep.json records its CKA and RGN "
        "picks).",
    ),
    out: Path = typer.Option(
        Path("runs/sweep"),
        help="Sweep directory: one training run per point and sweep.json. Run the same command again to resume.",
    ),
    **options: Any,
) -> None:
    from vitsplit.errors import RunInterrupted
    from vitsplit.sweep.grid import SweepConfig, run_sweep

    from .progress import RichProgress

    base = train_command.train_config(
        **options, auto_split=auto_split, k_t=None, prior_layers=None, method="vitsplit", out=out, resume=False
    )
    cfg = SweepConfig(
        base=base,
        k_t=k_t or [],
        seeds=seeds,
        methods=_methods(method),
        out=str(out),
        analysis=analysis,
        prior_layers=[parse_layer_list(p, "--prior-layers") for p in prior_layers or []],
    )
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        with RichProgress(enabled=main, keep_finished=False) as progress:
            result = run_sweep(cfg, progress)
    except RunInterrupted as e:  # the same command resumes a sweep (finished points are skipped)
        raise Interrupted(e, resume_flag=None) from None
    if main:
        print_sweep(result, out)


def print_sweep(result: dict[str, Any], out: Path) -> None:
    """The per-K_t table (mean +- SD over seeds, parameters, step time), the baselines and the best, on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    points = result["points"]
    table = Table(
        title=f"sweep: {result['task']} {result['metric']} ({'higher' if result['higher_is_better'] else 'lower'} is "
        f"better)"
    )
    for col in ("K_t", "seeds", f"{result['metric']} mean", "SD", "trainable params", "step time (s)"):
        table.add_column(col)
    for key, s in result["summary"].items():
        pts = [p for p in points if p["method"] == "vitsplit" and str(p["k_t"]) == key.split("@")[0]]
        params = pts[0]["trainable_params"] if pts else None
        steps = [p["step_time_s"] for p in pts if p["step_time_s"] is not None]
        table.add_row(
            key,
            str(s["n"]),
            f"{s['mean']:.2f}",
            "-" if s["sd"] is None else f"{s['sd']:.2f}",
            "-" if params is None else f"{params / 1e6:.2f}M",
            f"{sum(steps) / len(steps):.3f}" if steps else "-",
        )
    for m, s in result["baselines"].items():
        table.add_row(m, str(s["n"]), f"{s['mean']:.2f}", "-" if s["sd"] is None else f"{s['sd']:.2f}", "", "")
    console.print(table)
    if result["best_k_t"] is not None:
        pooled = result["pooled_sd"]
        console.print(
            f"best K_t {result['best_k_t']} (highest mean)" + (f"; pooled seed SD {pooled:.2f}" if pooled else "")
        )
    for name, k in (result.get("picks") or {}).items():
        if k is not None:
            console.print(f"{name.upper()} pick for {result['task']}: K_t {k}")
    console.print(
        f"wrote {out}/sweep.json ({len(points)} points)"
        + (f"; the report of {result['analysis']} shows it" if result.get("analysis") else "")
    )


def register(app: typer.Typer) -> None:
    """Add ``cka-split sweep`` to ``app``."""
    app.command(
        help="Train ViT-Split at several K_t (and seeds, prior-layer choices) and the baselines at the same budget; "
        "each point a training run, SWEEP/sweep.json with the per-K_t mean and SD. Takes every option of train."
    )(sweep)
