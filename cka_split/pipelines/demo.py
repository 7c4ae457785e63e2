"""The embedded default: the whole idea, offline, on a laptop CPU (``cka-split demo``).

1. The synthetic scenes (:mod:`vitsplit.data.synthetic`), at the demo's zoom (``DemoPlan.data``):
   objects a few patches across, so that a few hundred training steps learn them.
2. ``demo-vit``, a small DINOv2-architecture ViT that cka-split pretrained itself with a pretext that
   is neither segmentation nor detection (SimCLR on the default-zoom scenes, :mod:`vitsplit.pretrain`).
   Its weights ship in the package (``cka-split pretrain-demo`` makes them again); a checkout without
   them pretrains them once into the cache.
3. ``analyze`` with tasks seg and det (both copies fine-tuned here), the recommendation, PCA maps on
   synthetic probes and on real photographs that scikit-image ships in its wheel.
4. ``train --auto-split`` for seg, and the ``linear`` and ``full`` baselines at the same budget
   (same data, schedule, iterations, batch and crop), each evaluated on the same validation scenes.

The report (``reports``) and the terminal summary are the CLI's part. Everything here is measured,
not assumed: whichever method wins on the synthetic data is what the summary and report say.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cka_split.probes.pca import pca_maps
from cka_split.probes.rgn import DEFAULT_BATCHES
from vitsplit.backbones import build_backbone
from vitsplit.backbones.demo_vit import CACHE_FOLDER, DEMO_RECIPE, SHIPPED_WEIGHTS, cache_path, find_demo_vit
from vitsplit.engine import TrainConfig, train
from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write_json, ensure_writable_dir
from vitsplit.model.configs import PRETRAINED_LR_SCALE
from vitsplit.ops.imagenet import IMAGENET_MEAN, IMAGENET_STD
from vitsplit.pretrain import load_or_pretrain_demo_vit
from vitsplit.progress import NULL_PROGRESS, Progress

from .analyze import AnalyzeConfig, run_analyze

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
# The demo's world: 4 object classes at zoom 2 (an object spans 3-5 patches of 14 px at 112 px),
# trained without the random 0.5-2x rescale (the scenes are drawn at the training size). At zoom 1
# with 8 classes no method (linear, full, ViT-Split, any backbone) got past predicting background
# everywhere within the demo's budget; the rescale cost ViT-Split 8 mIoU points at 300 steps (README).
DEMO_DATA = "synthetic:zoom=2,classes=4,rescale=0"
METHODS = ("vitsplit", "linear", "full")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (``quick``: fewer steps, probes and scenes)."""

    quick: bool = False
    data: str = DEMO_DATA
    image_size: int = 112
    finetune_steps_seg: int = 150
    finetune_steps_det: int = 15  # a Mask R-CNN step costs ~7.8 s here (2 cores): 15 steps ~2 minutes
    finetune_batch_size: int = 8
    finetune_lr: float = 3e-3
    probe_images: int = 128
    cka_batch_size: int = 16  # 8 minibatches: the fewest the CKA's jackknife SE needs (MIN_SE_BATCHES)
    pca_images: int = 3
    rgn_batches: int = DEFAULT_BATCHES  # the gradient-norm rival's minibatches
    train_iters: int = 150  # ~60 s per ViT-Split run on 2 cores: the split-validation benchmark's budget too
    train_batch_size: int = 8
    train_lr: float = 1e-3
    train_pretrained_lr_scale: float = PRETRAINED_LR_SCALE  # ViT-Split's task head, full FT's backbone
    train_length: int = 2000
    val_length: int = 64
    seed: int = 0


FULL_PLAN = DemoPlan()
QUICK_PLAN = DemoPlan(
    quick=True,
    finetune_steps_seg=60,
    finetune_steps_det=2,
    probe_images=64,
    cka_batch_size=8,
    pca_images=2,
    rgn_batches=2,
    train_iters=60,
    train_length=480,
    val_length=32,
)


def demo_plan(quick: bool) -> DemoPlan:
    return QUICK_PLAN if quick else FULL_PLAN


def photographs(size: int) -> tuple[list[str], torch.Tensor]:
    """Real photographs shipped inside scikit-image's wheel, centre-cropped square, resized to
    ``size`` and ImageNet-normalised: (names, (N, 3, size, size))."""
    import skimage.data  # noqa: PLC0415 - scikit-image takes seconds to import; only the demo's photographs need it

    out, names = [], []
    for name in PHOTOS:
        img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s, :3]
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        t = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
            IMAGENET_STD
        )[:, None, None]
        out.append(t)
        names.append(name)
    return names, torch.stack(out)


def _photo_pca(run: Path, size: int, device: str, progress: Progress) -> None:
    """PCA maps of the photographs for every model of the run, in RUN/pca/photos/."""
    cfg = json.loads((run / "config.json").read_text())
    models = {"pretrained": build_backbone("demo-vit", cfg["weights"])}
    for task in cfg["options"]["tasks"]:
        models[task] = build_backbone("demo-vit", str(run / "finetuned" / f"{task}.safetensors"))
    names, images = photographs(size)
    with torch.no_grad():
        index = pca_maps(models, images, run / "pca" / "photos", device=device, progress=progress)
    index["photo_names"] = names
    atomic_write_json(run / "pca" / "photos" / "index.json", index)


def run_demo(out: Path, plan: DemoPlan = FULL_PLAN, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Steps 1-4 of the module docstring into ``out`` (the analysis run directory; training runs go
    to ``out/training/<method>``). Returns a summary dict (also saved as ``out/demo.json``)."""
    out = Path(out)
    if find_demo_vit() is None:  # where the pretrained weights will go, and where the run will go: before any work
        ensure_writable_dir(cache_path(DEMO_RECIPE).parent, CACHE_FOLDER)
    ensure_writable_dir(out, "--out")
    if any(out.iterdir()):
        raise UserError(f"{out} already holds files; give a new --out directory")
    t0 = time.time()
    timings: dict[str, float] = {}

    t = time.time()
    found = find_demo_vit()
    if found is None:
        progress.log(f"no shipped demo-vit: pretraining it once (cached for later runs), {DEMO_RECIPE.describe()}")
        load_or_pretrain_demo_vit(DEMO_RECIPE, progress=progress)
        found = cache_path(DEMO_RECIPE)
    weights = str(found)
    backbone = build_backbone("demo-vit", weights)
    timings["load demo-vit" if found == SHIPPED_WEIGHTS else "pretrain demo-vit"] = time.time() - t

    t = time.time()
    cfg = AnalyzeConfig(
        model="demo-vit",
        weights=weights,
        tasks=["seg", "det"],
        finetune_steps=plan.finetune_steps_seg,
        finetune_steps_per_task={"det": plan.finetune_steps_det},
        finetune_lr=plan.finetune_lr,
        finetune_batch_size=plan.finetune_batch_size,
        probe_images=plan.probe_images,
        batch_size=plan.cka_batch_size,
        image_size=plan.image_size,
        device="cpu",
        seed=plan.seed,
        out=str(out),
        pca_images=plan.pca_images,
        data={"*": plan.data},
        rgn_batches=plan.rgn_batches,
    )
    run, rec = run_analyze(cfg, progress=progress)
    _photo_pca(run, plan.image_size, "cpu", progress)
    timings["analyze (fine-tune seg and det copies, CKA, PCA)"] = time.time() - t

    results: dict[str, Any] = {}
    for method in METHODS:
        t = time.time()
        tcfg = TrainConfig(
            task="seg",
            method=method,
            model="demo-vit",
            weights=weights,
            data=plan.data,
            auto_split=str(run) if method == "vitsplit" else None,
            iters=plan.train_iters,
            batch_size=plan.train_batch_size,
            crop=plan.image_size,
            lr=plan.train_lr,
            seed=plan.seed,
            pretrained_lr_scale=plan.train_pretrained_lr_scale,
            checkpoint_every=max(1, plan.train_iters // 2),
            log_every=max(1, plan.train_iters // 30),
            out=str(run / "training" / method),
            device="cpu",
            train_length=plan.train_length,
            val_length=plan.val_length,
        )
        metrics = train(tcfg, progress=progress)
        results[method] = _training_summary(run / "training" / method, metrics)
        timings[f"train seg ({method})"] = time.time() - t

    timings["total"] = time.time() - t0
    summary = {
        "plan": asdict(plan),
        "recipe_id": DEMO_RECIPE.recipe_id,
        "weights_source": backbone.weights_source,
        "recommendation": rec.to_json(),
        "results": results,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "verdict": verdict(results),
    }
    atomic_write_json(run / "demo.json", summary)
    return summary


def _training_summary(out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads((out / "config.json").read_text())
    speeds = [json.loads(line).get("it_s") for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [s for s in speeds if s]
    return {
        "mIoU": metrics.get("mIoU"),
        "aAcc": metrics.get("aAcc"),
        "trainable_params": cfg.get("trainable_params"),
        "k_t": cfg.get("k_t"),
        "prior_layers": cfg.get("prior_layers"),
        "step_time_s": float(np.median([1.0 / s for s in speeds])) if speeds else None,
    }


def verdict(results: dict[str, Any]) -> str:
    """Which method reached the best mIoU, as measured, and whether the recommended ViT-Split trains
    more parameters than full fine-tuning (a split that then saves nothing)."""
    scored = {m: r["mIoU"] for m, r in results.items() if r.get("mIoU") is not None}
    if not scored:
        return "no method was evaluated"
    best = max(scored, key=scored.get)
    parts = ", ".join(f"{m} {v:.1f}" for m, v in scored.items())
    if best == "vitsplit":
        text = f"ViT-Split reached the best mIoU on the synthetic validation scenes ({parts})."
    else:
        text = f"ViT-Split did not beat the {best} baseline on the synthetic validation scenes ({parts})."
    split_params = results.get("vitsplit", {}).get("trainable_params")
    full_params = results.get("full", {}).get("trainable_params")
    if split_params and full_params and split_params > full_params:
        text += (
            f" The recommended ViT-Split trains more parameters ({split_params / 1e6:.2f}M) than full "
            f"fine-tuning ({full_params / 1e6:.2f}M)."
        )
    return text
