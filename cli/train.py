"""``cka-split train``: ViT-Split (or a baseline: linear, full, lora, vit-adapter) on one task."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from vitsplit.engine.config import TRAIN_RANGES

from .interrupt import Interrupted
from .options import checked, parse_layer_list


def train(
    auto_split: Optional[str] = typer.Option(
        None,
        "--auto-split",
        help="Take model, weights, K_t and prior layers from RUN/recommendation.json: a run dir, or 'latest' for "
        "runs/latest. Explicit options override.",
    ),
    k_t: Optional[int] = typer.Option(
        None, "--k-t", help="Task-head blocks (copies of the last K_t blocks).", callback=checked(TRAIN_RANGES["k_t"])
    ),
    prior_layers: Optional[str] = typer.Option(None, help="Comma-separated 0-based prior layers, e.g. 2,5,8,11."),
    task: str = typer.Option("seg", help="seg, det or depth."),
    method: str = typer.Option(
        "vitsplit",
        help="vitsplit, linear, full, lora, vit-adapter or vit-comer (ViT-Adapter, ViT-CoMer: segmentation).",
    ),
    head: str = typer.Option(
        "linear",
        help="Baseline segmentation head: linear, or upernet (UperNet + auxiliary FCN head; with full, lora, "
        "vit-adapter, vit-comer).",
    ),
    model: Optional[str] = typer.Option(
        None,
        help="Backbone name: dinov2_vit{s,b,l,g}14[_reg], a timm ViT (e.g. deit_small_patch16_224), hf:DIR, demo-vit "
        "(default dinov2_vits14, or the recommendation's).",
    ),
    weights: Optional[str] = typer.Option(
        None, help="auto, random, or a weights file (default auto, or the recommendation's)."
    ),
    data: str = typer.Option("synthetic", help="Data spec."),
    val_data: Optional[str] = typer.Option(
        None, help="Data spec for the final evaluation (default: --data's val split)."
    ),
    iters: int = typer.Option(
        40000, help="Training iterations (optimizer steps).", callback=checked(TRAIN_RANGES["iters"])
    ),
    batch_size: int = typer.Option(
        8,
        help="Images per optimizer step (over all processes and accumulation steps).",
        callback=checked(TRAIN_RANGES["batch_size"]),
    ),
    grad_accum: int = typer.Option(
        1, help="Gradient accumulation steps per optimizer step.", callback=checked(TRAIN_RANGES["grad_accum"])
    ),
    crop: int = typer.Option(512, help="Training crop size.", callback=checked(TRAIN_RANGES["crop"])),
    lr: Optional[float] = typer.Option(
        None,
        help="Learning rate (default: the published one for the model size and task).",
        callback=checked(TRAIN_RANGES["lr"]),
    ),
    pretrained_lr_scale: Optional[float] = typer.Option(
        None,
        help="lr multiplier of the weights that start pretrained: ViT-Split's task head, full fine-tuning's backbone "
        "(default 0.1, the release's).",
        callback=checked(TRAIN_RANGES["pretrained_lr_scale"]),
    ),
    weight_decay: Optional[float] = typer.Option(
        None, help="AdamW weight decay (default 1e-2; 0.05 for det).", callback=checked(TRAIN_RANGES["weight_decay"])
    ),
    warmup_iters: Optional[int] = typer.Option(
        None,
        help="Linear warm-up steps (default min(1500, iters // 10)).",
        callback=checked(TRAIN_RANGES["warmup_iters"]),
    ),
    seed: int = typer.Option(
        0, help="Seed (data order, augmentation, head init).", callback=checked(TRAIN_RANGES["seed"])
    ),
    checkpoint_every: int = typer.Option(
        500, help="Write OUT/last.pt every N steps.", callback=checked(TRAIN_RANGES["checkpoint_every"])
    ),
    log_every: int = typer.Option(
        10, help="Append to OUT/metrics.jsonl every N steps.", callback=checked(TRAIN_RANGES["log_every"])
    ),
    out: Path = typer.Option(Path("runs/train"), help="Output directory."),
    resume: bool = typer.Option(False, help="Continue from OUT/last.pt."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."),
    num_workers: int = typer.Option(
        0, help="DataLoader worker processes.", callback=checked(TRAIN_RANGES["num_workers"])
    ),
    train_length: Optional[int] = typer.Option(
        None, help="Training set length (synthetic: number of scenes).", callback=checked(TRAIN_RANGES["train_length"])
    ),
    val_length: Optional[int] = typer.Option(
        None, help="Validation set length (synthetic: number of scenes).", callback=checked(TRAIN_RANGES["val_length"])
    ),
    eval_mode: str = typer.Option("whole", help="Final evaluation: whole or slide."),
    lora_rank: int = typer.Option(8, help="LoRA rank (--method lora).", callback=checked(TRAIN_RANGES["lora_rank"])),
    no_masks: bool = typer.Option(False, "--no-masks", help="Detection without masks (Faster R-CNN)."),
) -> None:
    options = dict(locals())  # every option, by name (first statement: nothing else is local yet)
    from vitsplit.engine import train as run_train
    from vitsplit.errors import RunInterrupted

    from .progress import RichProgress, console

    cfg = train_config(**options)
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        with RichProgress(enabled=main) as progress:
            result = run_train(cfg, progress)
    except RunInterrupted as e:  # typer would turn it into a bare exit code 130
        raise Interrupted(e) from None
    if main:
        shown = {k: v for k, v in result.items() if k not in ("IoU", "class_names")}
        console.print(
            "[bold]final metrics[/bold] "
            + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        )
        console.print(f"wrote {out}/config.json, metrics.jsonl, last.pt, model.safetensors, eval.json")


def train_config(**options: Any):
    """The :class:`vitsplit.engine.TrainConfig` of ``cka-split train``'s options, given by parameter name
    (``cka-split sweep`` builds its points' shared options with it too)."""
    from vitsplit.engine import TrainConfig

    opts = dict(options)
    opts["prior_layers"] = parse_layer_list(opts.get("prior_layers"), "--prior-layers")
    opts["masks"] = not opts.pop("no_masks", False)
    opts["out"] = str(opts["out"])
    return TrainConfig(**opts)


def register(app: typer.Typer) -> None:
    """Add ``cka-split train`` to ``app``."""
    app.command(
        help="Train ViT-Split (with --auto-split: the split an analysis recommended) or a baseline: linear, full, "
        "lora, vit-adapter, vit-comer (--head linear|upernet)."
    )(train)
