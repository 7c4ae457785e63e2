"""The ``compare`` pipeline and the directory it writes.

1. Build every model (``models``, each with its ``weights``: auto, random or a path).
2. One pass over ``probe_images`` validation images of ``data`` (the same images, in the same
   minibatches, for every model): :func:`cka_split.pipelines.compare.compare_models`.
3. ``OUT/compare.npz`` + ``OUT/compare.json`` (:meth:`Comparison.save`) and ``OUT/config.json``
   (every resolved option, versions, each model's weights source and state hash). The report
   (``OUT/report.html``) is the reports package's job; the CLI builds it right after this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from cka_split.estimator.cka import MIN_SE_BATCHES
from cka_split.estimator.features import FEATURE_MODES
from vitsplit.backbones import backbone_config, build_backbone
from vitsplit.device import resolve_device
from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write_json, versions
from vitsplit.progress import NULL_PROGRESS, Progress
from vitsplit.ranges import COUNT, NON_NEGATIVE, Range

from .analyze import default_run_dir, probe_loader
from .compare import Comparison, compare_models


@dataclass
class CompareConfig:
    """Every option of ``cka-split compare`` (saved in OUT/config.json under "options")."""

    models: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)  # model -> auto | random | PATH
    default_weights: str = "auto"
    data: str = "synthetic"
    probe_images: int = 16 * MIN_SE_BATCHES  # enough minibatches for a usable jackknife SE
    batch_size: int = 16
    image_size: int = 224  # a multiple of 14 and 16: no model pads, token grids cover the same pixels
    features: str = "tokens"
    device: str = "auto"
    seed: int = 0
    out: str | None = None

    def weights_for(self, model: str) -> str:
        return self.weights.get(model, self.default_weights)

    def probe_spec(self) -> str:
        return self.data


def parse_weights(items: list[str] | None, models: list[str]) -> tuple[dict[str, str], str]:
    """``['random']`` or ``['dinov3_vitb16=PATH', 'vit_base_patch16_clip_224.openai=auto']`` ->
    ({model: weights}, the default for the rest). A NAME= must be one of ``models``."""
    out: dict[str, str] = {}
    default = "auto"
    for item in items or []:
        name, sep, value = item.rpartition("=")
        if not sep:
            default = item
            continue
        if name not in models:
            raise UserError(f"--weights {item}: '{name}' is not one of --models ({' '.join(models)})")
        if name in out:
            raise UserError(f"--weights gives '{name}' twice")
        out[name] = value
    return out, default


# The numeric options' allowed values; the CLI checks the same table while parsing.
COMPARE_RANGES: dict[str, Range] = {
    "probe_images": COUNT,
    "batch_size": COUNT,
    "image_size": COUNT,
    "seed": NON_NEGATIVE,
}


def validate(cfg: CompareConfig) -> None:
    """Every check that needs no model or data."""
    if len(cfg.models) < 2:
        raise UserError("compare needs at least two --models")
    if len(set(cfg.models)) != len(cfg.models):
        raise UserError(f"--models lists a model twice: {' '.join(cfg.models)}")
    for m in cfg.models:
        w = cfg.weights_for(m)
        if w not in ("auto", "random") and not Path(w).exists():
            raise UserError(f"--weights for {m}: {w}: no such file or folder (use auto, random, or a weights file)")
    if cfg.features not in FEATURE_MODES:
        raise UserError(f"--features {cfg.features}: use {', '.join(FEATURE_MODES)}")
    for name, allowed in COMPARE_RANGES.items():
        allowed.check(f"--{name.replace('_', '-')}", getattr(cfg, name))
    if cfg.batch_size < 4:
        raise UserError(
            f"--batch-size {cfg.batch_size}: the unbiased CKA estimator needs at least 4 images per minibatch"
        )
    if cfg.probe_images < 2 * cfg.batch_size:
        raise UserError(
            f"--probe-images {cfg.probe_images} gives fewer than 2 minibatches of {cfg.batch_size}: "
            "the uncertainty needs at least 2 (and 8 to be usable)"
        )


def run_compare(cfg: CompareConfig, progress: Progress = NULL_PROGRESS) -> tuple[Path, Comparison]:
    """Build the models, compare them on the probe images, write the directory. Returns (OUT, result)."""
    validate(cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out) if cfg.out else default_run_dir(Path("runs") / "compare")
    models = {}
    task = progress.task("Loading models", total=len(cfg.models))
    for name in cfg.models:
        models[name] = build_backbone(name, cfg.weights_for(name)).to(device)
        task.advance(1)
    task.close()
    loader, _ = probe_loader(cfg)
    cmp = compare_models(models, loader, features=cfg.features, progress=progress)
    cmp.save(out)
    atomic_write_json(
        out / "config.json",
        {
            "command": "compare",
            "options": asdict(cfg),
            "versions": versions(),
            "device": str(device),
            "models": {n: backbone_config(bb) for n, bb in models.items()},
        },
    )
    return out, cmp
