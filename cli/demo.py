"""``cka-split demo``: the whole pipeline offline on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.app import app, not_built


@app.command(help="Run the whole pipeline offline on the synthetic scenes with the demo ViT.")
def demo(
    out: Optional[Path] = typer.Option(None, help="Output directory (default runs/demo-<timestamp>)."),
    quick: bool = typer.Option(False, help="Smaller everything, same steps (about 3 minutes)."),
) -> None:
    raise not_built("demo")
