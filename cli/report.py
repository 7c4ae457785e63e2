"""``cka-split report``: rebuild RUN/report.html from a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app, not_built


@app.command(help="Rebuild the self-contained HTML report of an analysis run.")
def report(run_dir: Path = typer.Argument(..., help="An analysis run directory.")) -> None:
    raise not_built("report")
