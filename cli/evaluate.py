"""``cka-split evaluate``: metrics of a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vitsplit.evaluation.evaluate import EVAL_RANGES

from .options import checked


def evaluate(
    checkpoint: Path = typer.Argument(..., help="A training output directory or its model.safetensors."),
    data: Optional[str] = typer.Option(
        None, help="Data spec (default: the one the model was trained with; its val split)."
    ),
    mode: str = typer.Option("whole", help="whole or slide (sliding window at the training crop)."),
    stride: Optional[int] = typer.Option(
        None,
        help="Sliding-window stride (default 2/3 of the crop, mmseg's 341 for 512).",
        callback=checked(EVAL_RANGES["stride"]),
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Also write the metrics to this JSON file."),
) -> None:
    from vitsplit.evaluate import evaluate_checkpoint
    from vitsplit.fileio import atomic_write_json, check_output_file

    from .progress import RichProgress, console

    if out is not None:
        check_output_file(out, "--out")  # before the evaluation, not after it
    with RichProgress() as progress:
        result = evaluate_checkpoint(checkpoint, data=data, mode=mode, stride=stride, device=device, progress=progress)
    if out is not None:
        atomic_write_json(out, result)
    shown = {k: v for k, v in result.items() if k not in ("IoU", "class_names")}
    console.print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    typer.echo(json.dumps(shown))


def register(app: typer.Typer) -> None:
    """Add ``cka-split evaluate`` to ``app``."""
    app.command(help="Evaluate a trained checkpoint (mIoU, COCO mAP, or depth errors).")(evaluate)
