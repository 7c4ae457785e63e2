"""``cka-split compare``: the layer structure of several models on the same probe images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer

from cka_split.pipelines.compare_run import COMPARE_RANGES
from vitsplit.errors import UserError

from .options import checked
from .progress import RichProgress


def compare(
    ctx: typer.Context,
    models: List[str] = typer.Option(
        ...,
        "--models",
        help="Two or more model names (dinov3_vitb16, dinov2_vitb14, "
        "vit_base_patch16_clip_224.openai, ...; repeat or list).",
    ),
    weights: Optional[List[str]] = typer.Option(
        None,
        help="NAME=auto|random|PATH for one model, or auto|random|PATH "
        "for every model not named (repeatable; default auto).",
    ),
    data: str = typer.Option(
        "synthetic", help="Probe image spec: synthetic, ade20k:DIR, cityscapes:DIR, folder:DIR, coco:ANN.json:IMG_DIR."
    ),
    probe_images: int = typer.Option(
        128,
        help="Images on which CKA is computed (the same for every model).",
        callback=checked(COMPARE_RANGES["probe_images"]),
    ),
    batch_size: int = typer.Option(
        16,
        help="Minibatch size (>= 4); the uncertainty needs >= 8 minibatches.",
        callback=checked(COMPARE_RANGES["batch_size"]),
    ),
    features: str = typer.Option("tokens", help="tokens (resampled to a common grid), mean, or cls."),
    image_size: int = typer.Option(
        224,
        help="Probe image size in pixels (224 is a multiple of 14 and 16).",
        callback=checked(COMPARE_RANGES["image_size"]),
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for the probe images.", callback=checked(COMPARE_RANGES["seed"])),
    out: Optional[Path] = typer.Option(None, help="Output directory (default runs/compare/<timestamp>)."),
) -> None:
    from cka_split.reports import build_compare_report

    from cka_split.pipelines.compare_run import CompareConfig, parse_weights, run_compare

    names = [m for item in models for m in item.replace(",", " ").split()]
    for extra in ctx.args:  # `--models A B C`: click takes one value per --models; the rest arrive as extra args
        if extra.startswith("-"):
            raise UserError(f"unexpected argument '{extra}' (see 'cka-split compare --help')")
        names.append(extra)
    per_model, default = parse_weights(weights, names)
    cfg = CompareConfig(
        models=names,
        weights=per_model,
        default_weights=default,
        data=data,
        probe_images=probe_images,
        batch_size=batch_size,
        image_size=image_size,
        features=features,
        device=device,
        seed=seed,
        out=str(out) if out is not None else None,
    )
    with RichProgress() as progress:
        path, cmp = run_compare(cfg, progress=progress)
        report = build_compare_report(path)
    splits = cmp.splits()
    print(f"How cleanly each model splits (boundary contrast +- jackknife SE over {cmp.num_batches} minibatches):")
    for name, s in sorted(splits.items(), key=lambda kv: -kv[1].split if math.isfinite(kv[1].split) else math.inf):
        print(f"  {name}: {s.split:.3f} +- {s.split_se:.3f} at block {s.boundary} of {s.num_layers}")
    print(f"report: {report}")


def register(app: typer.Typer) -> None:
    """Add ``cka-split compare`` to ``app``."""
    app.command(
        context_settings={"allow_extra_args": True},
        help="Compare the layer structure of several models on the same probe images: each model's own block-by-block "
        "CKA and how cleanly it splits into groups, and CKA across every pair of models.",
    )(compare)
