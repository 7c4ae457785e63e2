"""``cka-split train``: ViT-Split (or a baseline) on one task."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.app import app, not_built


@app.command(help="Train ViT-Split (with --auto-split: the split an analysis recommended) or a baseline: linear, full, lora.")
def train(
    auto_split: Optional[str] = typer.Option(None, "--auto-split", help="Take K_t and prior layers from RUN/recommendation.json (give 'latest' or a run dir).", is_flag=False, flag_value="runs/latest"),
    k_t: Optional[int] = typer.Option(None, "--k-t", help="Task-head blocks (copies of the last K_t blocks)."),
    prior_layers: Optional[str] = typer.Option(None, help="Comma-separated 0-based prior layers, e.g. 2,5,8,11."),
    task: str = typer.Option("seg", help="seg, det or depth."),
    method: str = typer.Option("vitsplit", help="vitsplit, linear, full or lora."),
    model: str = typer.Option("dinov2_vits14", help="Backbone name."),
    weights: str = typer.Option("auto", help="auto, random, or a weights file."),
    data: str = typer.Option("synthetic", help="Data spec."),
    iters: int = typer.Option(40000, help="Training iterations."),
    batch_size: int = typer.Option(8, help="Images per step."),
    crop: int = typer.Option(512, help="Training crop size."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the published one for the model size)."),
    seed: int = typer.Option(0, help="Seed."),
    checkpoint_every: int = typer.Option(500, help="Write OUT/last.pt every N steps."),
    out: Path = typer.Option(Path("runs/train"), help="Output directory."),
    resume: bool = typer.Option(False, help="Continue from OUT/last.pt."),
) -> None:
    raise not_built("train")
