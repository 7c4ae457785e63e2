"""Copy fine-tuning for the analysis: a fine-tuned copy of a backbone, trained by the trainer's loop."""

from __future__ import annotations

import copy
from typing import Callable

from ..backbones import Backbone
from ..data import build_dataset
from ..device import resolve_device
from ..errors import UserError
from ..model import Baseline
from ..model.heads import det_preset_for
from ..progress import NULL_PROGRESS, Progress
from .config import TrainConfig, finish_config, resolve_config
from .loop import fit, seed_everything


def finetune_backbone(
    backbone: Backbone,
    task: str,
    data_spec: str,
    steps: int,
    *,
    batch_size: int = 8,
    crop: int = 224,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    grad_accum: int = 1,
    masks: bool = True,
    progress: Progress = NULL_PROGRESS,
    on_step: Callable[[int, Backbone], bool] | None = None,
) -> Backbone:
    """A copy of ``backbone`` fine-tuned on ``task`` for ``steps`` steps (method "full": every
    backbone weight plus the baseline head, the trainer's recipe); ``backbone`` is left untouched.

    ``on_step(step, copy)``: called after every step with the copy being trained (in train mode);
    True stops the fine-tuning there (the schedule still spans ``steps``).

    The returned backbone is in eval mode, frozen, on ``device``; its ``weights_source`` says how
    it was made."""
    if steps < 1:
        raise UserError(f"fine-tuning needs at least 1 step, got {steps}")
    cfg = resolve_config(
        TrainConfig(
            task=task,
            method="full",
            model=backbone.name,
            weights="given",
            data=data_spec,
            iters=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            crop=crop,
            lr=lr,
            seed=seed,
            device=device,
            checkpoint_every=steps,
            log_every=max(1, steps),
            masks=masks,
        )
    )
    finish_config(cfg, backbone)
    dev = resolve_device(cfg.device)
    seed_everything(seed)
    data = build_dataset(data_spec, "train", task=task, crop=crop, augment=True, seed=seed)
    copy_bb = copy.deepcopy(backbone).cpu()
    model = Baseline(
        copy_bb, "full", task, data.num_classes, masks=cfg.masks, det_preset=cfg.det_preset or det_preset_for(crop)
    )
    done = fit(
        model,
        data,
        cfg,
        device=dev,
        progress=progress,
        on_step=None if on_step is None else (lambda step: on_step(step, copy_bb)),
    )
    copy_bb.weights_source = (
        f"{backbone.weights_source} + full fine-tune on {task} ({data_spec}, {done['step']} "
        f"{'of ' + str(steps) + ' ' if done['step'] != steps else ''}steps, seed {seed})"
    )
    for p in copy_bb.parameters():
        p.requires_grad_(False)
    return copy_bb.eval()
