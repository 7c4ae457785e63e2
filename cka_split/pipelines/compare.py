"""Compare the layer structure of several vision foundation models on the same probe images.

ViT-Split's premise is that a model's blocks fall into groups -- early blocks shared by every task,
late ones task-specific -- and its paper notes that this grouping is "less distinct for other VFMs
(e.g. CLIP)" than for DINOv2. This module measures that on any set of backbones:

1. **One pass, the same images for every model.** Every block of every model becomes a feature set;
   CKA (Kornblith et al. 2019; the minibatch estimator of Nguyen et al. 2021, :mod:`cka_split.estimator.cka`)
   is computed between all of them, so each model's own block-by-block matrix and every cross-model
   matrix come from one accumulator. The per-minibatch HSIC terms are kept for the jackknife.
2. **Matching tokens across models.** CKA compares n x n Gram matrices, so feature widths may differ.
   Token grids differ too (patch 14 vs 16, or another input size): with ``features="tokens"`` each
   model's patch tokens (B, h*w, C), prefix tokens dropped, are area-resampled to the coarsest grid
   among the models (adaptive average pooling of the (B, C, h, w) map to (h*, w*)), so feature
   position k covers the same image region in every model (up to each model's centre padding, less
   than one patch). The within-model matrices use the same resampled features, so the diagonal blocks
   of the full matrix are each model's own CKA. ``features="mean"`` (mean patch token) and ``"cls"``
   need no matching.
3. **How cleanly each model splits** (:func:`boundary_contrast`). For a boundary s between blocks
   s-1 and s, compare pairs of blocks at the same distance d on the same side of s with pairs at
   distance d across s: ``contrast(s) = sum_d w_d (mean CKA same side - mean CKA across) / sum_d w_d``
   (w_d: the number of pairs across). A matrix that only decays with depth (CKA a function of |i-j|)
   has contrast 0 at every s; blocks that form distinct groups give a positive contrast at the group
   boundary. ``split`` is the largest contrast over s and ``boundary`` where it is. No threshold enters.
4. **Uncertainty.** Leave-one-minibatch-out jackknife (Efron & Stein 1981) over the kept HSIC terms:
   standard errors of the split contrast, of the difference between two models' contrasts (paired:
   same images), and how often the boundary stays put. The SE covers probe sampling, not the choice
   of probe distribution; the maximum over s is biased upward by noise, which the jackknife does not
   remove -- compare models on the same number of blocks' worth of evidence.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cka_split.estimator.analysis import batch_images, resolve_layers
from cka_split.estimator.cka import GramWorkspace, MinibatchCKA
from cka_split.estimator.features import FEATURE_MODES, BlockFeatures
from cka_split.estimator.jackknife import se_from_replicates
from cka_split.estimator.result import CKAResult
from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write, atomic_write_json
from vitsplit.progress import NULL_PROGRESS, Progress

FORMAT_VERSION = 1


# =========================================================================== the split statistic
def boundary_contrast(m: np.ndarray) -> np.ndarray:
    """Boundary contrast of a model's own (L, L) CKA matrix, for every boundary s = 1..L-1.

    contrast(s) = sum_d w_d (mean_{same side} M[i, i+d] - mean_{across} M[i, i+d]) / sum_d w_d over
    the distances d with pairs on both kinds, w_d = number of pairs (i, i+d) with i < s <= i+d.
    Returns (L-1,) float64, entry s-1 for boundary s; NaN where no distance has both kinds of pairs.
    """
    m = np.asarray(m, dtype=np.float64)
    L = m.shape[0]
    out = np.full(max(L - 1, 0), np.nan)
    for s in range(1, L):
        num = den = 0.0
        for d in range(1, L):
            i = np.arange(L - d)
            vals = m[i, i + d]
            across = (i < s) & (i + d >= s)
            if across.any() and (~across).any():
                w = float(across.sum())
                num += w * (vals[~across].mean() - vals[across].mean())
                den += w
        if den > 0:
            out[s - 1] = num / den
    return out


def split_of(m: np.ndarray) -> tuple[float, int]:
    """(largest boundary contrast, its boundary s) of an (L, L) matrix; (nan, 0) when undefined."""
    c = boundary_contrast(m)
    if c.size == 0 or np.all(np.isnan(c)):
        return float("nan"), 0
    k = int(np.nanargmax(c))
    return float(c[k]), k + 1


def jackknife_se(replicates: np.ndarray) -> float:
    """Leave-one-out jackknife SE (:func:`cka_split.estimator.jackknife.se_from_replicates`) of the B replicates
    (B,) of a scalar statistic, undefined (NaN) replicates dropped."""
    r = np.asarray(replicates, dtype=np.float64)
    return float(se_from_replicates(torch.from_numpy(r[~np.isnan(r)])))


# =========================================================================== token matching
class _TokenGrams:
    """Forward-hook transform: a model's patch tokens (B, h*w, C) -> area-resampled to the common
    grid (B, C * h* * w*) -> centred Gram (B, B); or, for mean/cls features, just the Gram."""

    def __init__(self, workspace: GramWorkspace, resample: bool):
        self.workspace = workspace
        self.resample = resample
        self.grid: tuple[int, int] = (0, 0)
        self.target: tuple[int, int] = (0, 0)

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        if self.resample:
            b, p, c = f.shape
            h, w = self.grid
            if p != h * w:
                raise UserError(f"a block gave {p} patch tokens for a {h}x{w} grid")
            f = f.reshape(b, h, w, c).permute(0, 3, 1, 2)
            if (h, w) != self.target:
                f = F.adaptive_avg_pool2d(f, self.target)
        return self.workspace(f)


# =========================================================================== the comparison
@dataclass
class ModelSplit:
    """How cleanly one model splits: the largest boundary contrast and where it is, with jackknife
    uncertainty. ``boundary_support``: the share of leave-one-out replicates with the same boundary;
    ``contrast`` / ``contrast_se``: the contrast at every boundary s = 1..L-1 and its SE."""

    name: str
    num_layers: int
    split: float
    split_se: float
    boundary: int
    boundary_support: float
    contrast: list[float]
    contrast_se: list[float]


@dataclass
class Comparison:
    """Everything :func:`compare_models` measured.

    ``result``: the CKA of every (model, block) with every other (:class:`CKAResult`; ``matrix(a, b)``
    is (L_a, L_b)); ``batch_hsic``: (B, F, F) float64 per-minibatch HSIC terms (their sum is the
    result's HSIC); ``grids``: each model's patch grid (h, w) at the probe size; ``common_grid``: the
    grid tokens were resampled to (features "tokens"); ``info``: per model {"weights_source",
    "embed_dim", "patch_size", "num_prefix_tokens"}."""

    result: CKAResult
    batch_hsic: torch.Tensor
    grids: dict[str, tuple[int, int]]
    common_grid: tuple[int, int] | None
    image_size: tuple[int, int]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.result.models)

    @property
    def num_batches(self) -> int:
        return int(self.batch_hsic.shape[0])

    def matrix(self, a: str, b: str) -> torch.Tensor:
        return self.result.matrix(a, b)

    def _replicates(self) -> list[CKAResult]:
        """The B leave-one-minibatch-out CKA results."""
        total = self.batch_hsic.sum(0)
        out = []
        for b in range(self.num_batches):
            acc = MinibatchCKA(unbiased=self.result.unbiased)
            acc.load_state_dict(
                {
                    "unbiased": self.result.unbiased,
                    "num_batches": self.num_batches - 1,
                    "num_examples": 0,
                    "hsic": total - self.batch_hsic[b],
                }
            )
            r = self.result
            out.append(
                CKAResult(
                    models=r.models,
                    layers=r.layers,
                    full=acc.compute(),
                    num_images=0,
                    features=r.features,
                    unbiased=r.unbiased,
                )
            )
        return out

    def splits(self) -> dict[str, ModelSplit]:
        """:class:`ModelSplit` of every model."""
        reps = self._replicates() if self.num_batches >= 2 else []
        out = {}
        for name in self.models:
            own = self.matrix(name, name).numpy()
            value, boundary = split_of(own)
            rep_mats = [r.matrix(name, name).numpy() for r in reps]
            rep = [split_of(m) for m in rep_mats]
            profiles = np.array([boundary_contrast(m) for m in rep_mats])  # (B, L-1)
            support = float(np.mean([s == boundary for _, s in rep])) if rep else float("nan")
            contrast = boundary_contrast(own)
            out[name] = ModelSplit(
                name=name,
                num_layers=own.shape[0],
                split=value,
                split_se=jackknife_se(np.array([v for v, _ in rep])) if rep else float("nan"),
                boundary=boundary,
                boundary_support=support,
                contrast=[float(v) for v in contrast],
                contrast_se=[jackknife_se(profiles[:, k]) if rep else float("nan") for k in range(contrast.size)],
            )
        return out

    def split_differences(self) -> dict[tuple[str, str], tuple[float, float]]:
        """{(a, b): (split_a - split_b, its paired jackknife SE)} for every ordered pair a before b."""
        reps = self._replicates() if self.num_batches >= 2 else []
        names = self.models
        full = {n: split_of(self.matrix(n, n).numpy())[0] for n in names}
        per_rep = [{n: split_of(r.matrix(n, n).numpy())[0] for n in names} for r in reps]
        out = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                diffs = np.array([r[a] - r[b] for r in per_rep])
                out[(a, b)] = (full[a] - full[b], jackknife_se(diffs) if reps else float("nan"))
        return out

    # ------------------------------------------------------------------------------- files
    def save(self, out_dir: str | Path) -> Path:
        """``compare.npz`` (the CKA result's arrays + per-minibatch HSIC, plain arrays) and
        ``compare.json`` (grids, model info, splits, pairwise differences) in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        r = self.result
        arrays = {
            "full": r.full.numpy(),
            "batch_hsic": self.batch_hsic.numpy(),
            "models": np.array(r.models, dtype=np.str_),
            "format_version": np.array(FORMAT_VERSION),
        }
        for name in r.models:
            arrays[f"layers/{name}"] = np.array(r.layers[name], dtype=np.int64)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(out / "compare.npz", write)
        splits = self.splits()
        diffs = self.split_differences()
        atomic_write_json(
            out / "compare.json",
            _json_ready(
                {
                    "format_version": FORMAT_VERSION,
                    "models": r.models,
                    "layers": r.layers,
                    "features": r.features,
                    "unbiased": r.unbiased,
                    "num_images": r.num_images,
                    "num_batches": self.num_batches,
                    "image_size": list(self.image_size),
                    "grids": {k: list(v) for k, v in self.grids.items()},
                    "common_grid": list(self.common_grid) if self.common_grid else None,
                    "info": self.info,
                    "splits": {k: vars(v) for k, v in splits.items()},
                    "split_differences": [
                        {"a": a, "b": b, "difference": d, "se": se} for (a, b), (d, se) in diffs.items()
                    ],
                }
            ),
        )
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "Comparison":
        d = Path(out_dir)
        try:
            meta = json.loads((d / "compare.json").read_text())
            with np.load(d / "compare.npz", allow_pickle=False) as z:
                models = [str(m) for m in z["models"]]
                layers = {m: [int(i) for i in z[f"layers/{m}"]] for m in models}
                full, hsic = torch.from_numpy(z["full"]).double(), torch.from_numpy(z["batch_hsic"]).double()
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise UserError(f"{d} does not hold a comparison written by 'cka-split compare' ({e})") from e
        result = CKAResult(
            models=models,
            layers=layers,
            full=full,
            num_images=int(meta["num_images"]),
            features=meta["features"],
            unbiased=bool(meta["unbiased"]),
            num_batches=int(meta["num_batches"]),
        )
        return cls(
            result=result,
            batch_hsic=hsic,
            grids={k: tuple(v) for k, v in meta["grids"].items()},
            common_grid=tuple(meta["common_grid"]) if meta["common_grid"] else None,
            image_size=tuple(meta["image_size"]),
            info=meta.get("info", {}),
        )


def _json_ready(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively through dicts, lists and tuples."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def _model_info(model: nn.Module) -> dict[str, Any]:
    return {k: getattr(model, k, None) for k in ("weights_source", "embed_dim", "patch_size", "num_prefix_tokens")}


def compare_models(
    models: Mapping[str, nn.Module],
    loader: Iterable,
    *,
    features: str = "tokens",
    unbiased: bool = True,
    progress: Progress = NULL_PROGRESS,
) -> Comparison:
    """CKA of every block of every model with every other, on the images of ``loader``.

    models: {name: Backbone} (each with ``grid_size``, ``num_prefix_tokens``; any depth, width and
    patch size); loader yields (B, 3, H, W) normalised images (or dicts with "image"), all of one
    size, B >= 4 for the unbiased estimator. ``features``: "tokens" (resampled to a common grid, see
    the module docstring), "mean" or "cls". The models stay on their devices.
    """
    if len(models) < 1:
        raise UserError("compare needs at least one model")
    if features not in FEATURE_MODES:
        raise UserError(f"unknown feature mode '{features}': use one of {', '.join(FEATURE_MODES)}")
    names = list(models)
    layers = resolve_layers(models, None)
    workspace = GramWorkspace()
    grams_of = {n: _TokenGrams(workspace, resample=features == "tokens") for n in names}
    devices = {n: next(iter(m.parameters())).device for n, m in models.items()}
    was_training = {n: m.training for n, m in models.items()}
    batch_hsic: list[torch.Tensor] = []
    size: tuple[int, int] | None = None
    grids: dict[str, tuple[int, int]] = {}
    common: tuple[int, int] | None = None
    num_images = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    task = progress.task("CKA across models", total)
    try:
        with ExitStack() as stack, torch.inference_mode():
            hooks = {
                n: stack.enter_context(BlockFeatures(models[n], layers[n], features, transform=grams_of[n]))
                for n in names
            }
            for m in models.values():
                m.eval()
            for batch in loader:
                x = batch_images(batch)
                if size is None:
                    size = (int(x.shape[-2]), int(x.shape[-1]))
                    grids = {n: tuple(int(v) for v in models[n].grid_size(*size)) for n in names}
                    common = (min(g[0] for g in grids.values()), min(g[1] for g in grids.values()))
                    for n in names:
                        grams_of[n].grid, grams_of[n].target = grids[n], common
                elif (int(x.shape[-2]), int(x.shape[-1])) != size:
                    raise UserError(f"probe images must share one size: got {tuple(x.shape[-2:])} after {size}")
                acc = MinibatchCKA(unbiased=unbiased)
                acc.check_batch_size(int(x.shape[0]))
                grams = []
                for n in names:
                    out = hooks[n](x.to(devices[n], non_blocking=True))
                    grams.extend(out[i].to(devices[names[0]]) for i in layers[n])
                acc.update_grams(torch.stack(grams))
                batch_hsic.append(acc.hsic.cpu())
                num_images += int(x.shape[0])
                task.advance(1)
    finally:
        task.close()
        for n, m in models.items():
            m.train(was_training[n])
    if not batch_hsic:
        raise UserError("the probe loader yielded no minibatch; give at least one minibatch of images")
    hsic = torch.stack(batch_hsic)
    acc = MinibatchCKA(unbiased=unbiased)
    acc.load_state_dict(
        {"unbiased": unbiased, "num_batches": len(batch_hsic), "num_examples": num_images, "hsic": hsic.sum(0)}
    )
    result = CKAResult(
        models=names,
        layers=layers,
        full=acc.compute(),
        num_images=num_images,
        features=features,
        unbiased=unbiased,
        num_batches=len(batch_hsic),
    )
    return Comparison(
        result=result,
        batch_hsic=hsic,
        grids=grids,
        common_grid=common if features == "tokens" else None,
        image_size=size,
        info={n: _model_info(models[n]) for n in names},
    )
