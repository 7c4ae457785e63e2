"""The options of a training run (:class:`TrainConfig`), their defaults, and where the split comes from."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backbones import Backbone
from ..backbones.reading import weights_path
from ..errors import UserError
from ..fileio import read_json
from ..model.baselines import check_head
from ..model.configs import LAYER_DECAY_METHODS, METHODS, PRETRAINED_LR_SCALE, TASKS, default_split
from ..model.heads import DET_PRESETS, det_preset_for
from ..ranges import COUNT, NON_NEGATIVE, POSITIVE, Range
from .schedule import default_warmup

SMALL_WIDTH = 384  # ViT-S's embedding width, the widest backbone that takes the small-model learning rate
# ViT-Adapter's released ADE20K learning rates (with layer-wise decay 0.95): 6e-5 for the 12-block
# DeiT-S/B configs, 2e-5 for the 24-block AugReg-L config.
ADAPTER_LR = {12: 6e-5, 24: 2e-5}
# Fields that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = (
    "resume",
    "max_steps_this_run",
    "out",
    "num_workers",
    "device",
    "evaluate",
    "eval_batch_size",
    "checkpoint_every",
)


# Options added after runs were first written, with the value a run saved before them used implicitly:
# a config.json without the key is read with it (resuming, and a sweep checking its finished points).
IMPLICIT_BEFORE = {
    "pretrained_lr_scale": lambda saved: None if saved.get("method") in LAYER_DECAY_METHODS else PRETRAINED_LR_SCALE
}


def check_pretrained_lr_scale(method: str, scale: float | None) -> None:
    """Refuse a ``--pretrained-lr-scale`` for vit-adapter and vit-comer, whose layer-wise lr decay sets
    the backbone's lr."""
    if method in LAYER_DECAY_METHODS and scale is not None:
        raise UserError(
            f"--pretrained-lr-scale does not apply to {method} (its layer-wise lr decay sets the backbone's lr)"
        )


def with_implicit_options(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config.json's options, with every key of ``IMPLICIT_BEFORE`` it lacks filled in."""
    out = dict(saved)
    for key, value in IMPLICIT_BEFORE.items():
        if key not in out:
            out[key] = value(saved)
    return out


# The numeric options' allowed values (None, "the default", always passes); the CLI checks the same
# table while parsing (cka_split.cli.options.checked).
TRAIN_RANGES: dict[str, Range] = {
    "k_t": COUNT,
    "iters": COUNT,
    "batch_size": COUNT,
    "grad_accum": COUNT,
    "crop": COUNT,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_iters": NON_NEGATIVE,
    "seed": NON_NEGATIVE,
    "checkpoint_every": COUNT,
    "log_every": COUNT,
    "num_workers": NON_NEGATIVE,
    "train_length": COUNT,
    "val_length": COUNT,
    "eval_stride": COUNT,
    "eval_batch_size": COUNT,
    "lora_rank": COUNT,
    "lora_alpha": POSITIVE,
    "max_steps_this_run": NON_NEGATIVE,
    "pretrained_lr_scale": POSITIVE,
}


@dataclass
class TrainConfig:
    """Every option of a training run; saved (resolved) as OUT/config.json.

    ``None`` means "the default for this model/task", filled in by :func:`resolve_config`:
    model dinov2_vits14, weights auto, K_t/prior layers from ``auto_split`` or the published table,
    lr :func:`default_lr` (3e-4 up to ViT-S width, 2e-4 wider, 1e-4 det; ViT-Adapter's own; set once
    the backbone is built, by :func:`finish_config`), weight decay 1e-2 (0.05 det), warm-up
    ``min(1500, iters // 10)``, ``pretrained_lr_scale`` (the lr multiplier of ViT-Split's task head and
    of full fine-tuning's backbone) :data:`~vitsplit.model.configs.PRETRAINED_LR_SCALE` (0.1, the
    release's; vit-adapter and vit-comer have their own layer-wise decay
    and take none). ``batch_size`` is the global batch of one
    optimizer step.
    ``head``: a baseline's segmentation head, linear or upernet (full, lora, vit-adapter, vit-comer).
    """

    task: str = "seg"
    method: str = "vitsplit"
    head: str = "linear"
    model: str | None = None
    weights: str | None = None
    data: str = "synthetic"
    val_data: str | None = None
    k_t: int | None = None
    prior_layers: list[int] | None = None
    auto_split: str | None = None
    split_source: str | None = None
    iters: int = 40000
    batch_size: int = 8
    grad_accum: int = 1
    crop: int = 512
    lr: float | None = None
    pretrained_lr_scale: float | None = None
    weight_decay: float | None = None
    warmup_iters: int | None = None
    warmup_ratio: float = 1e-6
    poly_power: float = 0.9
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    out: str = "runs/train"
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    train_length: int | None = None
    val_length: int | None = None
    eval_mode: str = "whole"
    eval_stride: int | None = None
    eval_batch_size: int = 4
    evaluate: bool = True
    masks: bool = True
    det_preset: str | None = None  # "coco" | "small"; None: by crop (vitsplit.model.heads.det_preset_for)
    lora_rank: int = 8
    lora_alpha: int = 16
    max_steps_this_run: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _read_pointer(path: Path) -> Path:
    """``runs/latest`` may be a symlink or a text file holding the run's path."""
    if path.is_file() and not (path / "recommendation.json").exists():
        target = Path(path.read_text().strip())
        return target if target.is_absolute() else (path.parent / target)
    return path


def split_from_recommendation(
    run_dir: str | os.PathLike, task: str, *, runs_dir: str | os.PathLike = "runs"
) -> tuple[int, list[int], str, str | None, str]:
    """(k_t, prior_layers, model, weights, source) for ``task`` from ``RUN/recommendation.json``.

    ``run_dir`` is a run directory, a symlink to one, or a text file with its path (``runs/latest``);
    ``"latest"`` means ``latest`` in ``runs_dir``, the runs folder (for a training run: the folder
    holding its ``--out``, ``runs/`` by default, where ``cka-split analyze`` keeps ``latest``).
    ``weights`` comes from the recommendation, else from ``RUN/config.json`` ("weights"), else None.
    ``source`` is the resolved path of the recommendation file.
    """
    run = _read_pointer(Path(runs_dir) / "latest" if str(run_dir) == "latest" else Path(run_dir))
    rec_path = run / "recommendation.json"
    if not rec_path.is_file():
        raise UserError(f"{rec_path} does not exist: run 'cka-split analyze' first, or give --k-t and --prior-layers")
    rec = read_json(rec_path)
    per_task = rec.get("per_task", {})
    if task not in per_task:
        raise UserError(
            f"{rec_path} has no recommendation for task '{task}' (it has: {', '.join(per_task) or 'none'}); "
            "analyze with that task or give --k-t and --prior-layers"
        )
    t = per_task[task]
    try:
        k_t, prior = int(t["k_t"]), [int(i) for i in t["prior_layers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{rec_path} has no usable k_t/prior_layers for '{task}' ({e}); re-run 'cka-split recommend'"
        ) from e
    weights = rec.get("weights")
    if weights is None and (run / "config.json").is_file():
        weights = read_json(run / "config.json").get("weights")
    if "model" not in rec:
        raise UserError(f"{rec_path} does not name its model; re-run 'cka-split recommend'")
    return k_t, prior, str(rec["model"]), weights, str(rec_path.resolve())


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that do not need the backbone (see :class:`TrainConfig`); validate."""
    cfg = copy.deepcopy(cfg)
    if cfg.task not in TASKS:
        raise UserError(f"unknown task '{cfg.task}': use seg, det or depth")
    if cfg.method not in METHODS:
        raise UserError(f"unknown method '{cfg.method}': use {', '.join(METHODS)}")
    if cfg.method == "vitsplit" and cfg.head != "linear":
        raise UserError(f"ViT-Split has its own linear segmentation head; --head {cfg.head} is for the baselines")
    if cfg.method != "vitsplit":
        check_head(cfg.head, cfg.method, cfg.task)
    if cfg.method in LAYER_DECAY_METHODS and cfg.task != "seg":
        raise UserError(f"--method {cfg.method} is built for segmentation (the paper's comparison), not '{cfg.task}'")
    for name, allowed in TRAIN_RANGES.items():
        allowed.check(f"--{name.replace('_', '-')}", getattr(cfg, name))
    if cfg.eval_mode not in ("whole", "slide"):
        raise UserError(f"unknown evaluation mode '{cfg.eval_mode}': use whole or slide")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision '{cfg.precision}': use auto, fp32 or bf16")
    explicit = cfg.k_t is not None or cfg.prior_layers is not None
    if cfg.auto_split is not None:
        if cfg.method != "vitsplit":
            raise UserError("--auto-split sets ViT-Split's K_t and prior layers; use it with --method vitsplit")
        k_t, prior, model, weights, source = split_from_recommendation(
            cfg.auto_split, cfg.task, runs_dir=Path(cfg.out).parent
        )
        overridden = [n for n in ("k_t", "prior_layers", "model", "weights") if getattr(cfg, n) is not None]
        cfg.k_t = k_t if cfg.k_t is None else cfg.k_t
        cfg.prior_layers = prior if cfg.prior_layers is None else cfg.prior_layers
        cfg.model = model if cfg.model is None else cfg.model
        cfg.weights = weights if cfg.weights is None else cfg.weights
        cfg.split_source = f"recommendation {source}" + (
            f" (overridden: {', '.join(overridden)})" if overridden else ""
        )
    elif explicit and cfg.method == "vitsplit":
        cfg.split_source = "explicit (--k-t/--prior-layers)"
    cfg.model = cfg.model or "dinov2_vits14"
    cfg.weights = cfg.weights or "auto"
    if cfg.weights not in ("auto", "random", "given"):
        weights_path(cfg.weights)  # a missing file or a symlink loop fails here, before the data is read
    if cfg.weight_decay is None:
        cfg.weight_decay = 0.05 if cfg.task == "det" else 1e-2
    check_pretrained_lr_scale(cfg.method, cfg.pretrained_lr_scale)
    if cfg.method not in LAYER_DECAY_METHODS and cfg.pretrained_lr_scale is None:
        cfg.pretrained_lr_scale = PRETRAINED_LR_SCALE
    if cfg.warmup_iters is None:
        cfg.warmup_iters = default_warmup(cfg.iters)
    if cfg.task == "det":
        cfg.det_preset = cfg.det_preset or det_preset_for(cfg.crop)
        if cfg.det_preset not in DET_PRESETS:
            raise UserError(f"unknown detection preset '{cfg.det_preset}': use {' or '.join(DET_PRESETS)}")
    if cfg.batch_size % cfg.grad_accum:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {cfg.grad_accum} accumulation steps")
    return cfg


def default_lr(task: str, backbone: Backbone, method: str = "vitsplit") -> float:
    """The published learning rates, chosen by what the backbone is, not by its name: detection 1e-4
    (the release's Mask R-CNN setting); otherwise 3e-4 for a ViT-S-width backbone (embedding width
    up to ``SMALL_WIDTH`` = 384, so narrower ViTs such as demo-vit too) and 2e-4 for wider ones
    (ViT-B/L/g, widths 768/1024/1536). ``vit-adapter``: the ViT-Adapter release's ``ADAPTER_LR``
    (6e-5 up to 12 blocks, 2e-5 deeper), also for ``vit-comer`` (the ViT-CoMer-S/B configs' 6e-5)."""
    if method in LAYER_DECAY_METHODS:
        return ADAPTER_LR[12] if backbone.num_layers <= 12 else ADAPTER_LR[24]
    if task == "det":
        return 1e-4
    return 3e-4 if backbone.embed_dim <= SMALL_WIDTH else 2e-4


def finish_config(cfg: TrainConfig, backbone: Backbone) -> None:
    """Fill the defaults that need the backbone: the learning rate, ViT-Split's K_t and prior layers."""
    if cfg.lr is None:
        cfg.lr = default_lr(cfg.task, backbone, cfg.method)
    if cfg.method != "vitsplit":
        cfg.k_t, cfg.prior_layers, cfg.split_source = None, None, None
        return
    k_t, prior, source = default_split(backbone.num_layers)
    if cfg.k_t is None or cfg.prior_layers is None:
        cfg.split_source = cfg.split_source or source
    cfg.k_t = k_t if cfg.k_t is None else int(cfg.k_t)
    cfg.prior_layers = prior if cfg.prior_layers is None else [int(i) for i in cfg.prior_layers]
