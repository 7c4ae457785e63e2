"""``cka-split analyze``: per-layer CKA of a pretrained ViT and its task-finetuned copies."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.app import app, not_built


@app.command(help="Collect per-layer activations of the pretrained model and task-finetuned copies, compute CKA for all layer pairs, draw PCA maps, and recommend K_t and prior layers per task.")
def analyze(
    model: str = typer.Option("dinov2_vits14", help="dinov2_vit{s,b,l,g}14[_reg], a timm ViT name, hf:<dir>, or demo-vit."),
    weights: str = typer.Option("auto", help="auto (pretrained from the local caches), random, or a weights file."),
    tasks: List[str] = typer.Option(["seg", "det"], "--tasks", help="Tasks to analyse: seg, det, depth (repeat or list)."),
    finetuned: Optional[List[str]] = typer.Option(None, help="TASK=PATH: a backbone fine-tuned elsewhere for TASK (repeatable)."),
    data: Optional[List[str]] = typer.Option(None, help="SPEC or TASK=SPEC: synthetic, ade20k:DIR, cityscapes:DIR, folder:DIR, coco:ANN.json:IMG_DIR."),
    finetune_steps: int = typer.Option(300, help="Steps of full fine-tuning for each task copy the tool makes."),
    probe_images: int = typer.Option(256, help="Images on which CKA is computed."),
    batch_size: int = typer.Option(32, help="Minibatch size of the CKA estimator (>= 4 for the unbiased one)."),
    features: str = typer.Option("tokens", help="tokens (patch tokens per image), mean, or cls."),
    image_size: int = typer.Option(224, help="Probe image size in pixels."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast; features are upcast for CKA)."),
    seed: int = typer.Option(0, help="Seed for data order, fine-tuning and initialisation."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<timestamp>)."),
) -> None:
    raise not_built("analyze")
