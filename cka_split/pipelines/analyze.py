"""The ``analyze`` pipeline and the run directory it writes (``docs/run-directory.md``).

1. Load the pretrained backbone; unless ``selector`` is "cka", the gradient-norm rival (:mod:`cka_split.probes.rgn`),
``RUN/rgn.json``.
2. Per task (not with ``selector`` "rgn"): load ``finetuned[task]`` (a backbone fine-tuned elsewhere) or fine-tune a
copy with the
   trainer (:func:`vitsplit.engine.finetune_backbone`) and save it to ``RUN/finetuned/TASK.safetensors``.
3. CKA of every block of every model, one pass over ``probe_images`` validation images
   (:func:`cka_split.estimator.analysis.analyze`), saved as ``RUN/cka.npz``.
4. PCA maps of the first ``pca_images`` probe images (:func:`cka_split.probes.pca.pca_maps`) in ``RUN/pca/``.
5. The recommendation (:func:`cka_split.decision.recommend.recommend_split`) in ``RUN/recommendation.json``,
   ``RUN/config.json`` (every resolved option, versions, seeds, weights sources and hashes); then
   ``runs/latest`` points at this run. The CLI builds ``RUN/report.html`` (``reports``) after this.

:func:`recommend_run` recomputes step 5's recommendation from a saved run without any model weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from cka_split.decision.cost import Budget, check_budget_tasks, full_finetune_param_counter, vitsplit_param_counter
from cka_split.decision.recommend import SplitRecommendation, recommend_split
from cka_split.estimator.analysis import analyze
from cka_split.estimator.cka import MIN_SE_BATCHES
from cka_split.estimator.result import CKAResult
from cka_split.probes.pca import pca_maps
from cka_split.probes.rgn import (
    DEFAULT_BATCHES,
    attach_rgn,
    check_rgn_options,
    load_rgn,
    rgn_for_tasks,
    rgn_recommendation,
    save_rgn,
)
from vitsplit.backbones import backbone_config, build_backbone
from vitsplit.backbones.hf import HF_WEIGHT_FILES, hf_weight_files
from vitsplit.data import TASKS, build_dataset, collate
from vitsplit.device import resolve_device
from vitsplit.engine import finetune_backbone
from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write, atomic_write_json, atomic_write_text, existing_path, sha256_file, versions
from vitsplit.progress import NULL_PROGRESS, Progress
from vitsplit.ranges import COUNT, NON_NEGATIVE, POSITIVE, Range
from vitsplit.runlock import LOCK_NAME, RunLock

AUTO_CHECK_BATCH = 8  # images per minibatch of the "auto" checks' probe set
FEATURES = ("tokens", "mean", "cls")
PRECISIONS = ("fp32", "bf16")


# The numeric options' allowed values (None: the default); the CLI checks the same table while parsing.
ANALYZE_RANGES: dict[str, Range] = {
    "finetune_steps": NON_NEGATIVE,
    "finetune_lr": POSITIVE,
    "finetune_batch_size": COUNT,
    "probe_images": COUNT,
    "batch_size": COUNT,
    "image_size": COUNT,
    "seed": NON_NEGATIVE,
    "pca_images": NON_NEGATIVE,
    "finetune_max_steps": COUNT,
    "finetune_check_every": COUNT,
    "finetune_patience": COUNT,
    "finetune_check_images": COUNT,
    "rgn_batches": COUNT,
}


@dataclass
class AnalyzeConfig:
    """Every option of ``cka-split analyze`` (saved in RUN/config.json under "options")."""

    model: str = "dinov2_vits14"
    weights: str = "auto"
    tasks: list[str] = field(default_factory=lambda: ["seg", "det"])
    finetuned: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)  # task -> spec; "*" = every task and the probes
    finetune_steps: int | str = 300  # or "auto": stop when the recommendation is stable (cka_split.probes.autostop)
    finetune_max_steps: int = 300  # "auto": at most this many steps (the schedule spans them)
    finetune_check_every: int = 25  # "auto": steps between checks
    finetune_patience: int = 3  # "auto": checks with an unchanged K_t before stopping
    finetune_check_images: int = 64  # "auto": probe images of each check (minibatches of 8)
    finetune_steps_per_task: dict[str, int] = field(default_factory=dict)  # overrides finetune_steps
    finetune_lr: float | None = None  # None: the trainer's default for the model
    finetune_batch_size: int = 8
    probe_images: int = 256
    batch_size: int = 32
    features: str = "tokens"
    image_size: int = 224
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    out: str | None = None
    unbiased: bool = True
    pca_images: int = 4
    max_trainable_params: Budget = None  # one number for every task, or {task: number}
    selector: str = "both"  # cka | rgn | both: which K_t selectors run (cka_split.probes.rgn)
    rgn_batches: int = DEFAULT_BATCHES  # minibatches of the RGN measurement

    def data_for(self, task: str) -> str:
        return self.data.get(task, self.data.get("*", "synthetic"))

    def probe_spec(self) -> str:
        """The probe images: the generic --data spec, else the first task's, else synthetic."""
        return self.data.get("*", self.data_for(self.tasks[0]))


def parse_data_options(items: list[str] | None) -> dict[str, str]:
    """['synthetic'] or ['seg=ade20k:DIR', 'det=coco:A.json:IMG'] -> {'*': ...} / {task: spec}."""
    out: dict[str, str] = {}
    for item in items or []:
        head, sep, rest = item.partition("=")
        key, spec = (head, rest) if sep and head in TASKS else ("*", item)
        if not spec:
            raise UserError(f"--data takes SPEC or TASK=SPEC, not '{item}'")
        if key in out:
            raise UserError("--data gives " + ("a generic spec" if key == "*" else f"task '{key}'") + " twice")
        out[key] = spec
    return out


def validate(cfg: AnalyzeConfig) -> None:
    """Every check that needs no model or data, so mistakes fail before minutes of work."""
    if not cfg.tasks:
        raise UserError("--tasks is empty; give at least one of seg, det, depth")
    for t in cfg.tasks:
        if t not in TASKS:
            raise UserError(f"unknown task '{t}': use seg, det or depth")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise UserError(f"--tasks lists a task twice: {' '.join(cfg.tasks)}")
    for t, path in cfg.finetuned.items():
        if t not in cfg.tasks:
            raise UserError(
                f"--finetuned {t}=... names task '{t}', which is not in --tasks ({' '.join(cfg.tasks)}); add it there "
                f"or drop it"
            )
        found = _given_path("--finetuned", f"{t}={path}", path)
        if found.is_dir() and not hf_weight_files(found):
            raise UserError(
                f"--finetuned {t}={path} is a folder without a weights file ({', '.join(HF_WEIGHT_FILES)}); "
                "give the fine-tuned weights file itself"
            )
    for t in cfg.data:
        if t != "*" and t not in cfg.tasks:
            raise UserError(f"--data {t}=... names task '{t}', which is not in --tasks ({' '.join(cfg.tasks)})")
    if cfg.weights not in ("auto", "random"):
        _given_path("--weights", cfg.weights, cfg.weights, hint=" (use auto, random, or a weights file)")
    if cfg.features not in FEATURES:
        raise UserError(f"--features {cfg.features}: use tokens, mean or cls")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision}: use fp32 or bf16")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {cfg.device}: use auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; use --device cpu or auto")
    for name, allowed in ANALYZE_RANGES.items():
        if not (name == "finetune_steps" and not isinstance(cfg.finetune_steps, int)):  # "auto": below
            allowed.check(f"--{name.replace('_', '-')}", getattr(cfg, name))
    if cfg.unbiased and cfg.batch_size < 4:
        raise UserError(
            f"--batch-size {cfg.batch_size} is too small for the unbiased CKA estimator, which needs at least 4 images "
            f"per minibatch"
        )
    if cfg.probe_images < cfg.batch_size:
        raise UserError(
            f"--probe-images {cfg.probe_images} is smaller than one minibatch (--batch-size {cfg.batch_size}); use "
            f"more probe images or a smaller batch"
        )
    check_rgn_options(cfg.selector, cfg.rgn_batches)
    check_budget_tasks(cfg.max_trainable_params, cfg.tasks)
    if cfg.finetune_steps == "auto":
        if cfg.finetune_check_images < AUTO_CHECK_BATCH:
            raise UserError(f"--finetune-check-images {cfg.finetune_check_images}: give at least {AUTO_CHECK_BATCH}")
    elif not isinstance(cfg.finetune_steps, int):
        raise UserError(f"--finetune-steps {cfg.finetune_steps}: give a number of steps or 'auto'")
    elif any(t not in cfg.finetuned for t in cfg.tasks) and cfg.finetune_steps < 1:
        raise UserError(
            f"--finetune-steps {cfg.finetune_steps}: tasks without --finetuned need at least 1 fine-tuning step"
        )


def _given_path(option: str, given: str, path: str, hint: str = "") -> Path:
    """``path`` (given as ``OPTION GIVEN``) resolved; 'OPTION GIVEN: no such file' if it is missing, a
    UserError naming it if it is a symlink loop."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_symlink():
        raise UserError(f"{option} {given}: no such file{hint}")
    return existing_path(p, option)


def default_run_dir(root: str | Path = "runs") -> Path:
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    out, k = base, 1
    while out.exists():
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def update_latest(run_dir: Path) -> Path:
    """Point ``latest`` beside ``run_dir`` (runs/latest for the default runs/<time>) at it: a relative
    symlink, replaced atomically; a text file holding the path where symlinks are not allowed."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        if link.is_dir() and not link.is_symlink():
            raise UserError(f"{link} is a directory; remove it so that it can point at the newest run")
        os.replace(tmp, link)
    except OSError:
        if tmp.is_symlink():
            tmp.unlink()
        atomic_write_text(link, str(run_dir.resolve()) + "\n")
    return link


def resolve_run_dir(path: str | Path) -> Path:
    """A run directory, or a ``latest`` link / text file pointing at one."""
    p = Path(path)
    if p.is_file() and not (p / "config.json").exists():
        p = Path(p.read_text().strip())
    if not p.is_dir():
        raise UserError(f"{path} is not a run directory; give one written by 'cka-split analyze'")
    return p


def save_backbone(bb, path: Path) -> Path:
    """The backbone's timm ``VisionTransformer`` state dict as safetensors (the layout loaders read)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in bb.vit.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "timm", "model": bb.name}))


def probe_loader(cfg: AnalyzeConfig):
    """Validation images of the probe spec, ``batch_size`` per minibatch, whole minibatches only."""
    ds = build_dataset(
        cfg.probe_spec(), "val", task="seg", crop=cfg.image_size, augment=False, length=cfg.probe_images, seed=cfg.seed
    )
    n = min(len(ds), cfg.probe_images)
    if n < cfg.batch_size:
        raise UserError(
            f"the probe data '{cfg.probe_spec()}' has {n} validation images, fewer than one minibatch "
            f"(--batch-size {cfg.batch_size}); use a smaller batch or more data"
        )
    if n < len(ds):
        ds = torch.utils.data.Subset(ds, range(n))
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, drop_last=True, collate_fn=collate, generator=g)
    return loader, (n // cfg.batch_size) * cfg.batch_size


def task_num_classes(cfg: AnalyzeConfig) -> dict[str, int]:
    """Classes of each task's data (seg classes, det object classes; 1 for depth)."""
    out = {}
    for t in cfg.tasks:
        if t == "depth":
            out[t] = 1
            continue
        ds = build_dataset(cfg.data_for(t), "val", task=t, crop=cfg.image_size, augment=False, length=1, seed=cfg.seed)
        out[t] = int(ds.num_classes)
    return out


def auto_probes(cfg: AnalyzeConfig, device: torch.device) -> list[torch.Tensor]:
    """The fixed probe minibatches of the ``--finetune-steps auto`` checks: the first
    ``finetune_check_images`` probe images (whole minibatches of AUTO_CHECK_BATCH), on ``device``."""
    ds = build_dataset(
        cfg.probe_spec(),
        "val",
        task="seg",
        crop=cfg.image_size,
        augment=False,
        length=cfg.finetune_check_images,
        seed=cfg.seed,
    )
    n = min(len(ds), cfg.finetune_check_images) // AUTO_CHECK_BATCH * AUTO_CHECK_BATCH
    if n < AUTO_CHECK_BATCH:
        raise UserError(
            f"the probe data '{cfg.probe_spec()}' has fewer than {AUTO_CHECK_BATCH} validation images for the "
            "--finetune-steps auto checks"
        )
    images = torch.stack([ds[i]["image"] for i in range(n)]).to(device)
    return list(images.split(AUTO_CHECK_BATCH))


def se_batches_warning(cfg: AnalyzeConfig) -> str | None:
    """A sentence when the probe set gives fewer minibatches than the jackknife SE needs."""
    batches = cfg.probe_images // cfg.batch_size
    if batches >= MIN_SE_BATCHES:
        return None
    return (
        f"--probe-images {cfg.probe_images} / --batch-size {cfg.batch_size} gives {batches} minibatch(es); the CKA's "
        f"jackknife SE needs at least {MIN_SE_BATCHES} to be reliable, so the noise judgements will be marked "
        f"unreliable "
        f"(use --probe-images {MIN_SE_BATCHES * cfg.batch_size} or a smaller --batch-size)"
    )


def run_analyze(cfg: AnalyzeConfig, progress: Progress = NULL_PROGRESS) -> tuple[Path, SplitRecommendation]:
    """The whole pipeline (module docstring). Returns (run directory, recommendation)."""
    validate(cfg)
    run = Path(cfg.out) if cfg.out else default_run_dir()
    with RunLock(run) as lock:  # one job per run directory (--out that cannot be written fails here)
        if any(p.name != LOCK_NAME for p in run.iterdir()):
            raise UserError(f"{run} already holds files; give a new --out directory")
        if lock.took_over():
            progress.log(lock.took_over())
        return _analyze_locked(cfg, run, progress)


def _analyze_locked(cfg: AnalyzeConfig, run: Path, progress: Progress) -> tuple[Path, SplitRecommendation]:
    t0 = time.time()
    started = datetime.now().isoformat(timespec="seconds")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    pretrained = build_backbone(cfg.model, cfg.weights, seed=cfg.seed if cfg.weights == "random" else None)
    pretrained.to(device).eval()
    models = {"pretrained": pretrained}
    sources: dict[str, dict[str, Any]] = {"pretrained": {"origin": "pretrained", "weights": cfg.weights}}
    run.mkdir(parents=True, exist_ok=True)
    rgn = (
        {}
        if cfg.selector == "cka"
        else rgn_for_tasks(
            pretrained,
            {t: cfg.data_for(t) for t in cfg.tasks},
            batches=cfg.rgn_batches,
            batch_size=cfg.finetune_batch_size,
            crop=cfg.image_size,
            seed=cfg.seed,
            device=device,
            progress=progress,
        )
    )
    if rgn:
        save_rgn(run / "rgn.json", rgn)
    for t in cfg.tasks if cfg.selector != "rgn" else []:  # --selector rgn: no task copies, no task CKA
        if t in cfg.finetuned:
            bb = build_backbone(cfg.model, cfg.finetuned[t])
            sources[t] = {"origin": "given (--finetuned)", "file": str(Path(cfg.finetuned[t]).resolve())}
        else:
            auto = cfg.finetune_steps == "auto" and t not in cfg.finetune_steps_per_task
            steps = cfg.finetune_max_steps if auto else cfg.finetune_steps_per_task.get(t, cfg.finetune_steps)
            on_step, stop = None, None
            if auto:
                from cka_split.probes.autostop import StabilityStop, stability_callback

                stop = StabilityStop(cfg.finetune_check_every, cfg.finetune_patience)
                on_step = stability_callback(
                    pretrained,
                    t,
                    auto_probes(cfg, device),
                    stop,
                    num_layers=pretrained.num_layers,
                    features=cfg.features,
                    unbiased=cfg.unbiased,
                )
            progress.log(
                f"fine-tuning a copy of {cfg.model} for {t}: {'at most ' if auto else ''}{steps} steps on "
                f"{cfg.data_for(t)}"
            )
            t_ft = time.time()
            bb = finetune_backbone(
                pretrained,
                t,
                cfg.data_for(t),
                steps,
                batch_size=cfg.finetune_batch_size,
                crop=cfg.image_size,
                lr=cfg.finetune_lr,
                seed=cfg.seed,
                device=str(device),
                progress=progress,
                on_step=on_step,
            )
            path = save_backbone(bb, run / "finetuned" / f"{t}.safetensors")
            used = stop.stopped_at if stop is not None and stop.stopped_at is not None else steps
            sources[t] = {
                "origin": "fine-tuned by analyze (method full)",
                "steps": used,
                "data": cfg.data_for(t),
                "file": str(path),
                "seconds": round(time.time() - t_ft, 2),
            }
            if stop is not None:
                sources[t]["auto"] = stop.to_json(steps, used)
        bb.to(device).eval()
        for p in bb.parameters():
            p.requires_grad_(False)
        models[t] = bb

    warning = se_batches_warning(cfg)
    if warning:
        progress.log("warning: " + warning)
    loader, n_used = probe_loader(cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with torch.no_grad(), autocast:
        res = analyze(models, loader, features=cfg.features, device=device, progress=progress, unbiased=cfg.unbiased)
    res.save(run / "cka.npz")

    pca_index = None
    if cfg.pca_images > 0:
        k = min(cfg.pca_images, len(loader.dataset))
        images = torch.stack([loader.dataset[i]["image"] for i in range(k)])
        with torch.no_grad(), autocast:
            pca_index = pca_maps(models, images, run / "pca", device=device, progress=progress)

    weights_arg, weights_file_sha = cfg.weights, None
    if cfg.weights not in ("auto", "random"):
        weights_arg, weights_file_sha = str(Path(cfg.weights).resolve()), sha256_file(cfg.weights)
    num_classes = task_num_classes(cfg)
    counter, full_counter = (
        vitsplit_param_counter(cfg.model, num_classes),
        full_finetune_param_counter(cfg.model, num_classes),
    )
    rec = (
        rgn_recommendation(rgn, model=cfg.model, num_layers=pretrained.num_layers, param_count=counter)
        if cfg.selector == "rgn"
        else recommend_split(
            res,
            tasks=cfg.tasks,
            model=cfg.model,
            num_layers=pretrained.num_layers,
            max_trainable_params=cfg.max_trainable_params,
            param_count=counter,
            full_count=full_counter,
        )
    )
    atomic_write_json(run / "recommendation.json", attach_rgn(rec, rgn).to_json())

    config = {
        "command": "analyze",
        "options": asdict(cfg) | {"out": str(run)},
        "resolved": {
            "device": str(device),
            "probe_spec": cfg.probe_spec(),
            "probe_images_used": int(res.num_images),
            "probe_images_available": n_used,
            "data": {t: cfg.data_for(t) for t in cfg.tasks},
            "num_classes": num_classes,
            "pca": "pca/index.json" if pca_index else None,
        },
        "seed": cfg.seed,
        "versions": versions(),
        "weights": weights_arg,
        "weights_source": pretrained.weights_source,
        "weights_file_sha256": weights_file_sha,
        "models": {name: backbone_config(bb) | sources[name] for name, bb in models.items()},
        "started": started,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(run / "config.json", config)
    update_latest(run)
    return run, rec


def recommend_run(
    run_dir: str | Path, max_trainable_params: Budget = None, **kwargs
) -> tuple[Path, SplitRecommendation]:
    """Recompute RUN/recommendation.json from RUN/cka.npz and RUN/config.json (no model weights; a
    budget builds ViT-Split on the meta device to count parameters). ``kwargs`` go to recommend_split."""
    run = resolve_run_dir(run_dir)
    with RunLock(run, what="RUN_DIR"):  # not while an analysis is still writing it
        return _recommend_locked(run, max_trainable_params, **kwargs)


def _recommend_locked(run: Path, max_trainable_params: Budget, **kwargs) -> tuple[Path, SplitRecommendation]:
    for name in ("config.json", "cka.npz"):
        if not (run / name).is_file():
            raise UserError(f"{run / name} is missing; is {run} a run written by 'cka-split analyze'?")
    try:
        config = json.loads((run / "config.json").read_text())
        opts = config["options"]
        model, tasks = opts["model"], list(opts["tasks"])
        num_layers = int(config["models"]["pretrained"]["num_layers"])
        num_classes = {t: int(n) for t, n in config["resolved"]["num_classes"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{run / 'config.json'} is not an analyze config ({e}); rerun 'cka-split analyze'") from e
    res = CKAResult.load(run / "cka.npz")
    check_budget_tasks(max_trainable_params, tasks)
    counter, full_counter = vitsplit_param_counter(model, num_classes), full_finetune_param_counter(model, num_classes)
    rgn = load_rgn(run / "rgn.json")
    rec = (
        rgn_recommendation(rgn, model=model, num_layers=num_layers, param_count=counter)
        if opts.get("selector") == "rgn"
        # an RGN-only run has no task copies to read K_t from
        else recommend_split(
            res,
            tasks=tasks,
            model=model,
            num_layers=num_layers,
            max_trainable_params=max_trainable_params,
            param_count=counter,
            full_count=full_counter,
            **kwargs,
        )
    )
    atomic_write_json(run / "recommendation.json", attach_rgn(rec, rgn).to_json())
    return run, rec
