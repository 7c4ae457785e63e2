"""``cka-split recommend``: recompute the split recommendation from a saved run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def print_recommendation(rec, run: Path) -> None:
    """A table of K_t and prior layers per task, then the evidence, on stdout."""
    console = Console(soft_wrap=False)
    table = Table(title=f"ViT-Split recommendation for {rec.model or 'the model'} ({rec.num_layers} blocks)")
    for col in (
        "task",
        "K_t",
        "task-head blocks",
        "prior layers",
        "b",
        "K_p",
        "divergence start",
        "trainable params",
        "x full FT",
        "backward avoided",
        "step (est.)",
    ):
        table.add_column(col)
    for t, s in rec.per_task.items():
        blocks = (
            f"{s.task_head_layers[0]}-{s.task_head_layers[-1]}"
            if len(s.task_head_layers) > 1
            else str(s.task_head_layers[0])
        )
        params = f"{s.trainable_params / 1e6:.2f}M" if s.trainable_params is not None else "-"
        start = "flat" if s.divergence_start is None else f"{s.divergence_start} ({s.divergence_kind})"
        vs_full = (
            "-" if s.params_vs_full is None else f"{s.params_vs_full:.2f}" + (" (!)" if s.larger_than_full else "")
        )
        avoided = "-" if s.backward_avoided is None else f"{s.backward_avoided:.0%}"
        step = "-" if s.step_time_ratio_estimate is None else f"{s.step_time_ratio_estimate:.2f}x"
        table.add_row(
            t,
            str(s.k_t),
            blocks,
            ",".join(map(str, s.prior_layers)),
            str(s.b),
            str(s.k_p),
            start,
            params,
            vs_full,
            avoided,
            step,
        )
    console.print(table)
    for t, s in rec.per_task.items():
        console.print(f"[bold]{t}[/bold]")
        for sentence in s.evidence:
            console.print(f"  - {sentence}", markup=False, soft_wrap=True)
    console.print(f"run: {run}  (recommendation.json, cka.npz, pca/, report.html)", markup=False, soft_wrap=True)
    console.print(
        f"train with it: cka-split train --auto-split {run} --task {next(iter(rec.per_task))} ...",
        markup=False,
        soft_wrap=True,
    )


def recommend(
    run_dir: Path = typer.Argument(..., help="An analysis run directory."),
    max_trainable_params: Optional[str] = typer.Option(
        None,
        help="Lower K_t until ViT-Split has at most this many trainable parameters (millions): one number, or per task "
        "seg=12,det=40.",
    ),
) -> None:
    from cka_split.decision.cost import parse_budget
    from cka_split.pipelines.analyze import recommend_run

    run, rec = recommend_run(run_dir, max_trainable_params=parse_budget(max_trainable_params))
    print_recommendation(rec, run)


def register(app: typer.Typer) -> None:
    """Add ``cka-split recommend`` to ``app``."""
    app.command(
        help="Recompute the K_t / prior-layer recommendation from a saved analysis run, without touching a model."
    )(recommend)
