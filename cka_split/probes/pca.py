"""PCA feature maps: the first three principal components of a layer's patch tokens, drawn as RGB.

This is the visualisation of ViT-Split (Li et al., ICCV 2025, Fig. 1/3) and of DINOv2 (Oquab et al.
2023, Fig. 1): early blocks show textures and edges that look the same for the pretrained model and
its task-finetuned copies; late blocks look different per task. So that colours compare between
models, there is ONE PCA per layer, fitted on the patch tokens of every model at that layer
together (all probe images), and one colour scale per layer: each component is mapped to [0, 1]
with its 1st and 99th percentiles over all models and images.

Files written under ``out_dir`` (``RUN/pca/``):
- ``input_{i}.png``: probe image i (denormalised);
- ``{model}_L{layer}_{i}.png``: the map of probe image i at block ``layer`` of ``model``, upsampled
  with nearest neighbours to one patch = p x p pixels;
- ``grid_{i}.png``: all maps of image i, rows = models (in order), columns = layers (in order);
- ``index.json``: what :func:`pca_maps` returns (below), for the report.

Index: ``{"models": [...], "layers": [...], "num_images": N, "grid_hw": [h, w], "patch_size": p,
"explained_variance": {"<layer>": [r1, r2, r3]}, "images": [{"input": file, "grid": file,
"maps": {model: {"<layer>": file}}}], "grid_rows": models, "grid_cols": layers}`` (file names
relative to ``out_dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vitsplit.fileio import atomic_write, atomic_write_json
from vitsplit.progress import NULL_PROGRESS, Progress

_MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
_STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)


def fit_pca3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-3 principal axes of x (n, C), float64.

    Returns (mean (C,), axes (3, C) with unit rows, explained-variance ratios (3,)). Each axis'
    sign is fixed so that its largest-magnitude entry is positive (deterministic colours).
    If C < 3 the missing axes are zero.
    """
    x = x.to(torch.float64)
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)[:3]
    axes = evecs[:, order].T.clone()
    for k in range(axes.shape[0]):
        if axes[k, axes[k].abs().argmax()] < 0:
            axes[k] = -axes[k]
    total = evals.clamp_min(0).sum()
    ratios = (evals[order].clamp_min(0) / total) if total > 0 else torch.zeros(len(order), dtype=torch.float64)
    if axes.shape[0] < 3:
        pad = 3 - axes.shape[0]
        axes = torch.cat([axes, torch.zeros(pad, x.shape[1], dtype=torch.float64)])
        ratios = torch.cat([ratios, torch.zeros(pad, dtype=torch.float64)])
    return mean, axes, ratios


def to_rgb(proj: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> np.ndarray:
    """Projections (..., 3) -> uint8 RGB with each channel mapped [lo, hi] -> [0, 255] (clipped)."""
    span = (hi - lo).clamp_min(1e-12)
    v = ((proj - lo) / span).clamp(0, 1)
    return (v * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def _save_png(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised -> (H, W, 3) uint8."""
    x = image.detach().cpu().double().numpy() * _STD + _MEAN
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


@torch.no_grad()
def pca_maps(
    models: dict[str, torch.nn.Module],
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    layers: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    gap: int = 2,
    progress: Progress = NULL_PROGRESS,
) -> dict:
    """Draw PCA maps of ``images`` for every model and layer; write PNGs and index.json to ``out_dir``.

    models: name -> :class:`vitsplit.backbones.Backbone` (all the same architecture).
    images: (N, 3, H, W) ImageNet-normalised probe images.
    layers: 0-based blocks (default: all). Returns the index (also saved as index.json).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(models)
    first = models[names[0]]
    L = int(first.num_layers)
    layers = list(range(L)) if layers is None else sorted(int(x) for x in layers)
    p = int(first.patch_size)
    x = images.to(device)
    n = x.shape[0]
    hh, ww = first.grid_size(x.shape[-2], x.shape[-1])

    # patch tokens per model and layer: (N, h*w, C)
    task = progress.task("PCA maps: features", total=len(names))
    feats: dict[str, dict[int, torch.Tensor]] = {}
    for name in names:
        m = models[name]
        was_training = m.training
        m.eval()
        toks = m.forward_layers(x, layers)
        m.train(was_training)
        feats[name] = {l: t[:, m.num_prefix_tokens :].float().cpu() for l, t in toks.items()}
        task.advance(1)
    task.close()

    index: dict = {
        "models": names,
        "layers": layers,
        "num_images": n,
        "grid_hw": [hh, ww],
        "patch_size": p,
        "grid_rows": names,
        "grid_cols": layers,
        "explained_variance": {},
        "images": [],
    }
    for i in range(n):
        fn = f"input_{i}.png"
        _save_png(out / fn, _denormalize(images[i]))
        index["images"].append({"input": fn, "grid": f"grid_{i}.png", "maps": {name: {} for name in names}})

    tile_h, tile_w = hh * p, ww * p
    grids = [
        np.full((len(names) * (tile_h + gap) - gap, len(layers) * (tile_w + gap) - gap, 3), 255, np.uint8)
        for _ in range(n)
    ]
    task = progress.task("PCA maps: layers", total=len(layers))
    for col, l in enumerate(layers):
        stacked = torch.cat([feats[name][l].reshape(-1, feats[name][l].shape[-1]) for name in names])
        mean, axes, ratios = fit_pca3(stacked)
        proj = (stacked.double() - mean) @ axes.T  # (M*N*h*w, 3)
        lo = torch.quantile(proj, 0.01, dim=0)
        hi = torch.quantile(proj, 0.99, dim=0)
        rgb = to_rgb(proj, lo, hi).reshape(len(names), n, hh, ww, 3)
        index["explained_variance"][str(l)] = [float(r) for r in ratios]
        for row, name in enumerate(names):
            for i in range(n):
                tile = rgb[row, i].repeat(p, axis=0).repeat(p, axis=1)
                fn = f"{name}_L{l}_{i}.png"
                _save_png(out / fn, tile)
                index["images"][i]["maps"][name][str(l)] = fn
                y0, x0 = row * (tile_h + gap), col * (tile_w + gap)
                grids[i][y0 : y0 + tile_h, x0 : x0 + tile_w] = tile
        task.advance(1)
    task.close()
    for i in range(n):
        _save_png(out / f"grid_{i}.png", grids[i])
    atomic_write_json(out / "index.json", index)
    return index
