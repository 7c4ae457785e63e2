"""``cka-split evaluate``: metrics of a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app, not_built


@app.command(help="Evaluate a trained checkpoint (mIoU, COCO mAP, or depth errors).")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A training output directory or its model.safetensors."),
    data: str = typer.Option("synthetic", help="Data spec."),
    mode: str = typer.Option("whole", help="whole or slide (sliding window at the training crop)."),
) -> None:
    raise not_built("evaluate")
