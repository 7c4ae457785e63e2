"""``cka-split pretrain-demo``: make demo-vit's weights with the demo's recipe, as shipped in the package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .progress import RichProgress


def pretrain_demo(
    out: Optional[Path] = typer.Option(
        None, help="Where to write the weights (default: the demo-vit cache, $CKA_SPLIT_CACHE or ~/.cache/cka-split)."
    ),
) -> None:
    from vitsplit.backbones.demo_vit import DEMO_RECIPE, SHIPPED_SHA256, SHIPPED_WEIGHTS, cache_path
    from vitsplit.fileio import sha256_file
    from vitsplit.pretrain import pretrain_to_file

    path = out or cache_path(DEMO_RECIPE)
    with RichProgress() as progress:
        progress.log(f"pretraining demo-vit: {DEMO_RECIPE.describe()}, {DEMO_RECIPE.threads} thread(s)")
        pretrain_to_file(DEMO_RECIPE, path, progress)
    digest = sha256_file(path)
    console = Console()
    console.print(f"wrote {path}")
    console.print(f"sha256 {digest}")
    if digest == SHIPPED_SHA256:
        console.print(f"identical to the weights shipped in the package ({SHIPPED_WEIGHTS.name})")
    else:
        console.print(
            f"differs from the shipped weights (sha256 {SHIPPED_SHA256}): the bytes repeat only with the "
            "same PyTorch build and CPU instruction set"
        )


def register(app: typer.Typer) -> None:
    """Add ``cka-split pretrain-demo`` to ``app``."""
    app.command(
        name="pretrain-demo",
        help="Pretrain demo-vit with the demo's recipe (SimCLR on the synthetic scenes) and write the "
        "weights file; prints its sha256 and whether it is byte for byte the shipped one.",
    )(pretrain_demo)
