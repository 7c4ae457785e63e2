"""``cka-split report``: rebuild RUN/report.html from a run directory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .recommend import print_recommendation


def report(
    run_dir: Path = typer.Argument(..., help="An analysis run directory (or runs/latest)."),
    training: Optional[List[Path]] = typer.Option(
        None,
        "--training",
        help="A training run directory to include (repeatable); runs under RUN/training/ and runs whose config names "
        "RUN are found anyway.",
    ),
    sweep: Optional[List[Path]] = typer.Option(
        None,
        "--sweep",
        help="A sweep directory (cka-split sweep) to include (repeatable); sweeps under RUN and sweeps beside RUN "
        "whose sweep.json names RUN are found anyway.",
    ),
) -> None:
    from cka_split.reports import build_report

    path = build_report(
        run_dir,
        training_runs=training or None,
        sweeps=sweep or None,
        warn=lambda problem: print(f"cka-split: warning: {problem}", file=sys.stderr),
    )
    rec = path.parent / "recommendation.json"
    if rec.is_file():
        from cka_split.decision.recommend import SplitRecommendation
        from vitsplit.errors import UserError

        try:
            print_recommendation(SplitRecommendation.load(rec), path.parent)
        except UserError as e:  # the report is written; the table is a convenience
            print(f"(recommendation table not printed: {e})")
    print(f"report: {path}")


def register(app: typer.Typer) -> None:
    """Add ``cka-split report`` to ``app``."""
    app.command(
        help="Rebuild the self-contained HTML report of an analysis run (and of the training runs linked to it)."
    )(report)
