"""``cka-split recommend``: recompute the split recommendation from a saved run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.app import app, not_built


@app.command(help="Recompute the K_t / prior-layer recommendation from a saved analysis run, without touching a model.")
def recommend(
    run_dir: Path = typer.Argument(..., help="An analysis run directory."),
    max_trainable_params: Optional[float] = typer.Option(None, help="Lower K_t until ViT-Split has at most this many trainable parameters (millions)."),
) -> None:
    raise not_built("recommend")
