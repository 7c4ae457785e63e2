"""The pretext pretraining of ``demo-vit``: the small DINOv2-architecture ViT that ``cka-split demo``
uses, pretrained by cka-split itself with a pretext that is neither segmentation nor detection, so
that the demo asks "which layers do segmentation and detection reshape?" of a model that was
pretrained on something else.

Pretexts (``recipe.pretext``):

- ``simclr`` (the demo's): contrastive learning between two cropped, recoloured views of each image
  (:mod:`vitsplit.pretrain.simclr`). It gives demo-vit a layer hierarchy: on the demo's probe scenes
  CKA(block 0, block 11) falls far below 1 and the blocks form several CKA groups (README).
- ``mae``: MAE-style masked patch reconstruction (:mod:`vitsplit.pretrain.mae`). In the few hundred
  steps a CPU affords it leaves no hierarchy: block 0 makes one large, nearly linear change of the
  patch embedding and every later block writes 4-10 % of the residual stream, so CKA(block 0, block
  11) was 0.99 after 600 steps and rose with more steps (README).

Both report their loss against a ``baseline``, the loss of a model that knows nothing about the
image (MAE: predicting zero for every normalised masked patch; SimCLR: log(2B - 1), every view
equally similar to every other), so ``loss / baseline < 1`` is learning beyond chance.

Reproducibility: the weights are a pure function of the recipe on one kind of CPU and PyTorch build.
Every random number comes from generators seeded by the recipe, and the loop runs with exactly
``recipe.threads`` intra-op threads (the blocking of a matrix product, and with it the rounding,
depends on the thread count: one and two threads gave different weights; the same count gave
identical ones).

The recipe, its cache and the weights file are :mod:`vitsplit.backbones.demo_vit`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..backbones import Backbone
from ..backbones.demo_vit import (
    CACHE_FOLDER,
    DEMO_RECIPE,
    PRETEXTS,
    DemoRecipe,
    cache_path,
    create_demo_vit,
    load_demo_vit,
    save_demo_vit,
    weights_source,
)
from ..data import build_dataset
from ..errors import UserError
from ..fileio import ensure_writable_dir
from ..ops.imagenet import IMAGENET_MEAN, IMAGENET_STD
from ..progress import NULL_PROGRESS, Progress
from .mae import MaskedAutoencoder
from .simclr import SimCLR


@dataclass
class PretrainResult:
    """The pretrained ViT and its loss curve (one value per step), with the zero-prediction
    baseline of each step's batch."""

    vit: nn.Module
    recipe: DemoRecipe
    losses: list[float]
    baselines: list[float]


def _lr_at(step: int, recipe: DemoRecipe) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then half-cosine decay to 0 (as MAE)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def render_images(recipe: DemoRecipe, progress: Progress = NULL_PROGRESS) -> torch.Tensor:
    """The recipe's training images, rendered once: (N, 3, S, S) uint8 RGB, N = ``dataset_length``.

    Scenes come from ``build_dataset(recipe.data, "train", augment=False)`` (already ImageNet-
    normalised; undone here, exactly for 8-bit sources). They are kept in memory as 8-bit because
    rendering a synthetic scene costs about as much as a pretraining step on its whole batch; the
    per-step variety comes from a random horizontal flip and the pretext's random masks or views.
    """
    s = recipe.image_size
    ds = build_dataset(
        recipe.data, "train", task="seg", crop=s, augment=False, length=recipe.dataset_length, seed=recipe.seed
    )
    n = min(len(ds), recipe.dataset_length)
    if n < recipe.batch_size:
        raise UserError(f"{recipe.data} has {n} training images; demo pretraining needs at least {recipe.batch_size}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(n, 3, s, s, dtype=torch.uint8)
    task = progress.task(f"rendering {n} pretraining images", n)
    try:
        for i in range(n):
            img = ds[i]["image"]
            if tuple(img.shape) != (3, s, s):
                raise UserError(f"{recipe.data} gives {tuple(img.shape)} images; demo pretraining needs (3, {s}, {s})")
            out[i] = ((img * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
            task.advance(1)
    finally:
        task.close()
    return out


def _batch(images: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) rows ``idx`` -> normalised float (B, 3, S, S), rows with ``flip`` mirrored."""
    x = images[idx].float() / 255.0
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pretrain(recipe: DemoRecipe, progress: Progress = NULL_PROGRESS) -> PretrainResult:
    """Pretrain a fresh demo-vit with the recipe's pretext on CPU; deterministic for a recipe
    (global RNG state and the caller's thread count are restored afterwards)."""
    with flush_denormal(), intra_op_threads(recipe.threads):
        return _pretrain(recipe, progress)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, then put back the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def flush_denormal_enabled() -> bool:
    """Whether this thread flushes denormal floats to zero: with flushing on (DAZ), the smallest
    positive float32 denormal reads as 0."""
    return bool((torch.tensor([1e-45], dtype=torch.float32) * 1.0)[0] == 0.0)


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush denormal floats to zero inside the block, then put back the caller's setting.

    AdamW's second moments of rarely moving parameters become tiny; flushing their denormals
    keeps CPU arithmetic on them from slowing down. PyTorch offers no getter for the setting,
    so :func:`flush_denormal_enabled` measures it.
    """
    before = flush_denormal_enabled()
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(before)


def _pretrain(recipe: DemoRecipe, progress: Progress) -> PretrainResult:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        vit = create_demo_vit(recipe)
        with torch.no_grad():
            for name, param in vit.named_parameters():
                if name.endswith(("ls1.gamma", "ls2.gamma")):
                    param.fill_(recipe.layer_scale_init)
        bb = Backbone(vit, name="demo-vit", weights_source="being pretrained")
        model = pretext_model(bb, recipe)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "token" not in n]
        no_decay = [
            p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "token" not in n)
        ]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr,
            betas=(0.9, 0.95),
        )
        images = render_images(recipe, progress)
        gen = torch.Generator().manual_seed(recipe.seed + 1)  # batch order, flips, masks or views
        order = torch.randperm(len(images), generator=gen)
        pos = 0
        losses: list[float] = []
        baselines: list[float] = []
        model.train()
        task = progress.task(f"pretraining demo-vit ({PRETEXTS[recipe.pretext]})", recipe.steps)
        try:
            for step in range(recipe.steps):
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, recipe)
                if pos + recipe.batch_size > len(order):  # a new epoch, a new order
                    order, pos = torch.randperm(len(images), generator=gen), 0
                idx = order[pos : pos + recipe.batch_size]
                pos += recipe.batch_size
                flip = torch.rand(len(idx), generator=gen) < 0.5
                loss, baseline = model(_batch(images, idx, flip), gen)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"demo-vit pretraining diverged at step {step} (loss {loss.item()})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                opt.step()
                losses.append(loss.item())
                baselines.append(baseline.item())
                task.advance(1, loss=f"{losses[-1]:.3f}", rel=f"{losses[-1] / max(baselines[-1], 1e-12):.2f}")
        finally:
            task.close()
        vit.eval()
    return PretrainResult(vit=vit, recipe=recipe, losses=losses, baselines=baselines)


def pretext_model(backbone: Backbone, recipe: DemoRecipe) -> nn.Module:
    """The recipe's pretext around ``backbone``: a module whose ``forward(images, generator)`` gives
    ``(loss, baseline)``."""
    if recipe.pretext == "simclr":
        return SimCLR(
            backbone,
            view_size=recipe.view_size,
            crop_scale=(recipe.crop_min, 1.0),
            temperature=recipe.temperature,
            proj_hidden=recipe.proj_hidden,
            proj_dim=recipe.proj_dim,
        )
    grid = backbone.grid_size(recipe.image_size, recipe.image_size)
    return MaskedAutoencoder(
        backbone,
        grid,
        mask_ratio=recipe.mask_ratio,
        decoder_dim=recipe.decoder_dim,
        decoder_depth=recipe.decoder_depth,
        decoder_heads=recipe.decoder_heads,
    )


def pretrain_demo_vit(recipe: DemoRecipe = DEMO_RECIPE, progress: Progress = NULL_PROGRESS) -> Backbone:
    """Pretrain a demo-vit with ``recipe`` and return it as a Backbone (not saved; see
    :func:`load_or_pretrain_demo_vit` for the cached version)."""
    result = pretrain(recipe, progress)
    bb = Backbone(result.vit, name="demo-vit", weights_source=weights_source(recipe))
    bb.eval()
    return bb


def load_or_pretrain_demo_vit(
    recipe: DemoRecipe = DEMO_RECIPE, cache_dir: str | os.PathLike | None = None, progress: Progress = NULL_PROGRESS
) -> Backbone:
    """The demo-vit of ``recipe``: loaded from the cache if present, else pretrained and cached."""
    path = cache_path(recipe, cache_dir)
    if path.is_file():
        progress.log(f"using cached demo-vit {path}")
        return load_demo_vit(path)
    ensure_writable_dir(path.parent, CACHE_FOLDER)  # before minutes of pretraining, not after
    pretrain_to_file(recipe, path, progress)
    progress.log(f"saved demo-vit to {path}")
    return load_demo_vit(path)


def pretrain_to_file(recipe: DemoRecipe, path: str | os.PathLike, progress: Progress = NULL_PROGRESS) -> Path:
    """Pretrain with ``recipe`` and write the weights file (:func:`save_demo_vit`: the same bytes for
    the same recipe, thread count, PyTorch build and CPU instruction set). Returns ``Path(path)``."""
    result = pretrain(recipe, progress)
    return save_demo_vit(result.vit, recipe, path, result.losses, result.baselines)
