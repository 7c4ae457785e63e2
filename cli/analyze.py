"""``cka-split analyze``: per-layer CKA of a pretrained ViT and its task-finetuned copies."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cka_split.pipelines.analyze import ANALYZE_RANGES
from vitsplit.errors import UserError

from .options import checked, parse_task_map
from .progress import RichProgress
from .recommend import print_recommendation


def _steps(text: str) -> int | str:
    """--finetune-steps: a number of steps or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--finetune-steps takes a number of steps or 'auto', not '{text}'") from None


def analyze(
    ctx: typer.Context,
    model: str = typer.Option(
        "dinov2_vits14", help="dinov2_vit{s,b,l,g}14[_reg], a timm ViT name, hf:<dir>, or demo-vit."
    ),
    weights: str = typer.Option("auto", help="auto (pretrained from the local caches), random, or a weights file."),
    tasks: List[str] = typer.Option(
        ["seg", "det"], "--tasks", help="Tasks to analyse: seg, det, depth (repeat or list)."
    ),
    finetuned: Optional[List[str]] = typer.Option(
        None, help="TASK=PATH: a backbone fine-tuned elsewhere for TASK (repeatable)."
    ),
    data: Optional[List[str]] = typer.Option(
        None, help="SPEC or TASK=SPEC: synthetic, ade20k:DIR, cityscapes:DIR, folder:DIR, coco:ANN.json:IMG_DIR."
    ),
    finetune_steps: str = typer.Option(
        "300",
        help="Steps of full fine-tuning for each task copy the tool makes, or auto: stop once the recommendation is "
        "stable.",
    ),
    finetune_max_steps: int = typer.Option(
        300,
        help="With --finetune-steps auto: at most this many steps.",
        callback=checked(ANALYZE_RANGES["finetune_max_steps"]),
    ),
    finetune_check_every: int = typer.Option(
        25,
        help="With --finetune-steps auto: steps between checks of the recommendation.",
        callback=checked(ANALYZE_RANGES["finetune_check_every"]),
    ),
    finetune_patience: int = typer.Option(
        3,
        help="With --finetune-steps auto: stop when K_t has not changed for this many checks.",
        callback=checked(ANALYZE_RANGES["finetune_patience"]),
    ),
    finetune_check_images: int = typer.Option(
        64,
        help="With --finetune-steps auto: probe images of each check.",
        callback=checked(ANALYZE_RANGES["finetune_check_images"]),
    ),
    probe_images: int = typer.Option(
        256, help="Images on which CKA is computed.", callback=checked(ANALYZE_RANGES["probe_images"])
    ),
    batch_size: int = typer.Option(
        32,
        help="Minibatch size of the CKA estimator (>= 4 for the unbiased one).",
        callback=checked(ANALYZE_RANGES["batch_size"]),
    ),
    features: str = typer.Option("tokens", help="tokens (patch tokens per image), mean, or cls."),
    image_size: int = typer.Option(
        224, help="Probe image size in pixels.", callback=checked(ANALYZE_RANGES["image_size"])
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast; features are upcast for CKA)."),
    seed: int = typer.Option(
        0, help="Seed for data order, fine-tuning and initialisation.", callback=checked(ANALYZE_RANGES["seed"])
    ),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<timestamp>)."),
    pca_images: int = typer.Option(
        4, help="Probe images drawn as PCA feature maps (0: none).", callback=checked(ANALYZE_RANGES["pca_images"])
    ),
    max_trainable_params: Optional[str] = typer.Option(
        None,
        help="Lower K_t until ViT-Split has at most this many trainable parameters (millions): one number, or per task "
        "seg=12,det=40.",
    ),
    selector: str = typer.Option(
        "both",
        help="K_t selectors: cka (task copies + CKA), rgn (relative gradient norms of a few batches, Lee et al. 2023; "
        "no copies) or both.",
    ),
    rgn_batches: int = typer.Option(
        5,
        help="Minibatches (8 images each, the task copies' fine-tuning batch) over which RGN is averaged.",
        callback=checked(ANALYZE_RANGES["rgn_batches"]),
    ),
) -> None:
    from cka_split.decision.cost import parse_budget
    from cka_split.pipelines.analyze import AnalyzeConfig, parse_data_options, run_analyze

    # `--tasks seg det` (the documented form): click takes one value per --tasks; the rest arrive as extra args
    task_list = [t for item in tasks for t in item.replace(",", " ").split()]
    for extra in ctx.args:
        if extra.startswith("-"):
            raise UserError(f"unexpected argument '{extra}' (see 'cka-split analyze --help')")
        task_list.append(extra)
    cfg = AnalyzeConfig(
        model=model,
        weights=weights,
        tasks=task_list,
        finetuned=parse_task_map(finetuned, "--finetuned"),
        data=parse_data_options(data),
        finetune_steps=_steps(finetune_steps),
        finetune_max_steps=finetune_max_steps,
        finetune_check_every=finetune_check_every,
        finetune_patience=finetune_patience,
        finetune_check_images=finetune_check_images,
        probe_images=probe_images,
        batch_size=batch_size,
        features=features,
        image_size=image_size,
        device=device,
        precision=precision,
        seed=seed,
        out=str(out) if out is not None else None,
        pca_images=pca_images,
        max_trainable_params=parse_budget(max_trainable_params),
        selector=selector,
        rgn_batches=rgn_batches,
    )
    from cka_split.reports import build_report

    with RichProgress() as progress:
        run, rec = run_analyze(cfg, progress=progress)
        build_report(run)
    print_recommendation(rec, run)


def register(app: typer.Typer) -> None:
    """Add ``cka-split analyze`` to ``app``."""
    app.command(
        context_settings={"allow_extra_args": True},
        help="Collect per-layer activations of the pretrained model and task-finetuned copies, compute CKA for all "
        "layer pairs, draw PCA maps, and recommend K_t and prior layers per task.",
    )(analyze)
