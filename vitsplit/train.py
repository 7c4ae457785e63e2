"""One trainer for every task (seg, det, depth) and method (vitsplit, linear, full, lora).

Recipe (``shared/VITSPLIT_SPEC.md``): AdamW betas (0.9, 0.999), weight decay 1e-2 on every trainable
parameter (0.05 for detection, the published Mask R-CNN setting), the task head (pretrained-initialised
weights) at lr x 0.1, poly 0.9 with linear warm-up (:mod:`vitsplit.schedule`), gradient accumulation,
bf16 autocast on CUDA. Every method gets the same data, schedule and logging.

Data order is a pure function of (seed, step): sample position ``p = step * batch_size + j`` is
item ``perm_e[p mod n]`` of epoch ``e = p // n``, where ``perm_e`` is ``torch.randperm`` under a
generator seeded from (seed, e); items are augmented as a function of (seed, epoch, index)
(:mod:`vitsplit.data.dataset`). With RNG states, optimizer and schedule in ``OUT/last.pt``
(:mod:`vitsplit.checkpoint`), a resumed run ends bit-identical to an uninterrupted one on CPU.

Distributed (``torchrun``): one global batch per step is split into ``grad_accum * world_size``
micro-batches (micro-batch ``a`` of rank ``r`` is slice ``a * world + r``), so the images of a step
do not depend on the number of processes. Gradients are averaged by DDP; BatchNorm becomes
SyncBatchNorm on GPU (PyTorch's SyncBatchNorm has no CPU kernel: on CPU each rank keeps its own
batch statistics). Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, build_backbone, load_json
from .checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .errors import UserError
from .fileio import atomic_write, atomic_write_json, atomic_write_text, read_safetensors, versions
from .heads import DET_PRESETS, det_preset_for
from .progress import NULL_PROGRESS, Progress
from .schedule import PolyWarmup, default_warmup

METHODS = ("vitsplit", "linear", "full", "lora")
TASKS = ("seg", "det", "depth")
# Fields that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = ("resume", "max_steps_this_run", "out", "num_workers", "device", "evaluate", "eval_batch_size")


@dataclass
class TrainConfig:
    """Every option of a training run; saved (resolved) as OUT/config.json.

    ``None`` means "the default for this model/task", filled in by :func:`resolve_config`:
    model dinov2_vits14, weights auto, K_t/prior layers from ``auto_split`` or the published table,
    lr 3e-4 (S) / 2e-4 (others) / 1e-4 (det), weight decay 1e-2 (0.05 det), warm-up
    ``min(1500, iters // 10)``. ``batch_size`` is the global batch of one optimizer step.
    """

    task: str = "seg"
    method: str = "vitsplit"
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
    det_preset: str | None = None  # "coco" | "small"; None: by crop (vitsplit.heads.det_preset_for)
    lora_rank: int = 8
    lora_alpha: int = 16
    max_steps_this_run: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------ split resolution
def _read_pointer(path: Path) -> Path:
    """``runs/latest`` may be a symlink or a text file holding the run's path."""
    if path.is_file() and not (path / "recommendation.json").exists():
        target = Path(path.read_text().strip())
        return target if target.is_absolute() else (path.parent / target)
    return path


def split_from_recommendation(run_dir: str | os.PathLike, task: str) -> tuple[int, list[int], str, str | None, str]:
    """(k_t, prior_layers, model, weights, source) for ``task`` from ``RUN/recommendation.json``.

    ``run_dir`` is a run directory, a symlink to one, or a text file with its path (``runs/latest``);
    ``"latest"`` means ``runs/latest``.
    ``weights`` comes from the recommendation, else from ``RUN/config.json`` ("weights"), else None.
    ``source`` is the resolved path of the recommendation file.
    """
    run = _read_pointer(Path("runs/latest") if str(run_dir) == "latest" else Path(run_dir))
    rec_path = run / "recommendation.json"
    if not rec_path.is_file():
        raise UserError(f"{rec_path} does not exist: run 'cka-split analyze' first, or give --k-t and --prior-layers")
    rec = load_json(rec_path)
    per_task = rec.get("per_task", {})
    if task not in per_task:
        raise UserError(f"{rec_path} has no recommendation for task '{task}' (it has: {', '.join(per_task) or 'none'}); "
                        "analyze with that task or give --k-t and --prior-layers")
    t = per_task[task]
    try:
        k_t, prior = int(t["k_t"]), [int(i) for i in t["prior_layers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{rec_path} has no usable k_t/prior_layers for '{task}' ({e}); re-run 'cka-split recommend'") from e
    weights = rec.get("weights")
    if weights is None and (run / "config.json").is_file():
        weights = load_json(run / "config.json").get("weights")
    if "model" not in rec:
        raise UserError(f"{rec_path} does not name its model; re-run 'cka-split recommend'")
    return k_t, prior, str(rec["model"]), weights, str(rec_path.resolve())


def default_split(num_layers: int) -> tuple[int, list[int], str]:
    """Published (K_t, prior layers) by depth: 12 blocks (S/B) K_t 3, [2,5,8,11]; 24 (L) K_t 4,
    8 layers from 2; 40 (g) K_t 8, 14 layers from 27. Other depths (ours): K_t = round(L/4),
    4 layers uniform from b = 2 (b = 0 below 8 blocks)."""
    from .model import prior_layers_uniform

    table = {12: (3, 4, 2), 24: (4, 8, 2), 40: (8, 14, 27)}
    if num_layers in table:
        k_t, k_p, b = table[num_layers]
        return k_t, prior_layers_uniform(num_layers, k_p, b), "published default"
    b = 2 if num_layers >= 8 else 0
    k_t = max(1, round(num_layers / 4))
    return k_t, prior_layers_uniform(num_layers, min(4, num_layers - b), b), "default rule (K_t=round(L/4), 4 uniform prior layers)"


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that do not need the backbone (see :class:`TrainConfig`); validate."""
    cfg = copy.deepcopy(cfg)
    if cfg.task not in TASKS:
        raise UserError(f"unknown task '{cfg.task}': use seg, det or depth")
    if cfg.method not in METHODS:
        raise UserError(f"unknown method '{cfg.method}': use vitsplit, linear, full or lora")
    for name in ("iters", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if int(getattr(cfg, name)) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_mode not in ("whole", "slide"):
        raise UserError(f"unknown evaluation mode '{cfg.eval_mode}': use whole or slide")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision '{cfg.precision}': use auto, fp32 or bf16")
    explicit = cfg.k_t is not None or cfg.prior_layers is not None
    if cfg.auto_split is not None:
        if cfg.method != "vitsplit":
            raise UserError("--auto-split sets ViT-Split's K_t and prior layers; use it with --method vitsplit")
        k_t, prior, model, weights, source = split_from_recommendation(cfg.auto_split, cfg.task)
        overridden = [n for n in ("k_t", "prior_layers", "model", "weights") if getattr(cfg, n) is not None]
        cfg.k_t = k_t if cfg.k_t is None else cfg.k_t
        cfg.prior_layers = prior if cfg.prior_layers is None else cfg.prior_layers
        cfg.model = model if cfg.model is None else cfg.model
        cfg.weights = weights if cfg.weights is None else cfg.weights
        cfg.split_source = f"recommendation {source}" + (f" (overridden: {', '.join(overridden)})" if overridden else "")
    elif explicit and cfg.method == "vitsplit":
        cfg.split_source = "explicit (--k-t/--prior-layers)"
    cfg.model = cfg.model or "dinov2_vits14"
    cfg.weights = cfg.weights or "auto"
    if cfg.lr is None:
        cfg.lr = 1e-4 if cfg.task == "det" else (3e-4 if cfg.model.startswith("dinov2_vits14") else 2e-4)
    if cfg.weight_decay is None:
        cfg.weight_decay = 0.05 if cfg.task == "det" else 1e-2
    if cfg.warmup_iters is None:
        cfg.warmup_iters = default_warmup(cfg.iters)
    if cfg.task == "det":
        cfg.det_preset = cfg.det_preset or det_preset_for(cfg.crop)
        if cfg.det_preset not in DET_PRESETS:
            raise UserError(f"unknown detection preset '{cfg.det_preset}': use {' or '.join(DET_PRESETS)}")
    if cfg.batch_size % cfg.grad_accum:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {cfg.grad_accum} accumulation steps")
    return cfg


def _finish_split(cfg: TrainConfig, backbone: Backbone) -> None:
    if cfg.method != "vitsplit":
        cfg.k_t, cfg.prior_layers, cfg.split_source = None, None, None
        return
    k_t, prior, source = default_split(backbone.num_layers)
    if cfg.k_t is None or cfg.prior_layers is None:
        cfg.split_source = cfg.split_source or source
    cfg.k_t = k_t if cfg.k_t is None else int(cfg.k_t)
    cfg.prior_layers = prior if cfg.prior_layers is None else [int(i) for i in cfg.prior_layers]


# ----------------------------------------------------------------------------------- building
def build_model(cfg: TrainConfig, backbone: Backbone, num_classes: int) -> nn.Module:
    """ViT-Split or a baseline on ``backbone`` (which the model takes over)."""
    if cfg.method == "vitsplit":
        from .model import ViTSplit

        return ViTSplit(backbone, cfg.k_t, cfg.prior_layers, cfg.task, num_classes, masks=cfg.masks,
                        det_preset=cfg.det_preset or det_preset_for(cfg.crop))
    from .baselines import Baseline

    return Baseline(backbone, cfg.method, cfg.task, num_classes, masks=cfg.masks, lora_rank=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha, det_preset=cfg.det_preset or det_preset_for(cfg.crop))


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of ``epoch``: ``torch.randperm(n)`` under a generator seeded from (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0]))
    return torch.randperm(n, generator=g)


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of (index, epoch) pairs for this rank, for steps ``start .. iters-1``."""

    def __init__(self, n: int, seed: int, batch_size: int, grad_accum: int, rank: int, world: int, start: int, iters: int):
        self.n, self.seed, self.batch, self.accum = n, seed, batch_size, grad_accum
        self.rank, self.world, self.start, self.iters = rank, world, start, iters
        self.micro = batch_size // (grad_accum * world)
        self._perms: dict[int, torch.Tensor] = {}

    def step_items(self, step: int) -> list[tuple[int, int]]:
        """All (index, epoch) of the global batch of ``step``."""
        out = []
        for p in range(step * self.batch, (step + 1) * self.batch):
            e = p // self.n
            if e not in self._perms:
                self._perms = {e: epoch_permutation(self.seed, e, self.n)}
            out.append((int(self._perms[e][p % self.n]), e))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.iters):
            items = self.step_items(step)
            for a in range(self.accum):
                k = a * self.world + self.rank
                yield items[k * self.micro:(k + 1) * self.micro]

    def __len__(self) -> int:
        return (self.iters - self.start) * self.accum


class _EpochItems(torch.utils.data.Dataset):
    """dataset[(index, epoch)] -> the item as augmented in that epoch."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        if hasattr(self.dataset, "get"):
            return self.dataset.get(index, epoch)
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class _LossModule(nn.Module):
    """What DDP wraps: ``forward(batch) = model.loss(batch)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else [t.to(device) for t in v] if isinstance(v, list) else v)
            for k, v in batch.items()}


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _init_distributed(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "nccl" if (device_pref != "cpu" and torch.cuda.is_available()) else "gloo"
        dist.init_process_group(backend)
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)


def resolve_device(pref: str, dist_info: _Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {pref} was asked for but no CUDA GPU is visible; use --device cpu")
        if ":" in pref:
            return torch.device(pref)
        return torch.device("cuda", dist_info.local_rank if dist_info.world > 1 else torch.cuda.current_device())
    if pref != "cpu":
        raise UserError(f"unknown device '{pref}': use auto, cpu or cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def save_model(model: nn.Module, path: str | Path, train_config: dict[str, Any]) -> Path:
    """OUT/model.safetensors: trainable weights; metadata "vitsplit_config" (model.config()) and
    "train_config" (the resolved TrainConfig) so that :func:`load_trained` can rebuild the model."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {"vitsplit_config": json.dumps(model.config()), "train_config": json.dumps(train_config)}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_trained(path: str | Path) -> tuple[nn.Module, TrainConfig]:
    """(model in eval mode, its resolved TrainConfig) from OUT or OUT/model.safetensors.

    The backbone is rebuilt from the config's model and weights (ViT-Split's frozen backbone must
    be the same; full fine-tuning and LoRA restore their trained backbone weights from the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a training output directory or its model.safetensors")
    meta, state = read_safetensors(path)
    if "train_config" not in meta:
        raise UserError(f"{path} was not written by 'cka-split train' (no train_config in its metadata)")
    cfg = TrainConfig.from_dict(json.loads(meta["train_config"]))
    model_cfg = json.loads(meta["vitsplit_config"])
    if cfg.weights == "given":
        raise UserError(f"{path} was trained on a backbone given through the Python API; rebuild it and call "
                        "vitsplit.train.build_model + load_trainable_state_dict")
    backbone = build_backbone(cfg.model, cfg.weights, seed=cfg.seed if cfg.weights == "random" else None)
    model = build_model(cfg, backbone, int(model_cfg["num_classes"]))
    model.load_trainable_state_dict(state)
    return model.eval(), cfg


# ------------------------------------------------------------------------------------- training
def _metrics_upto(path: Path, step: int) -> None:
    """Keep only the metrics lines of steps <= ``step`` (a killed run may have logged past its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if rec["iter"] <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def fit(model: nn.Module, dataset: Any, cfg: TrainConfig, *, device: torch.device, dist_info: _Dist | None = None,
        out: Path | None = None, progress: Progress = NULL_PROGRESS, start: dict[str, Any] | None = None,
        on_step: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """The training loop. Writes metrics.jsonl and last.pt under ``out`` (rank 0) when ``out`` is given.

    ``start``: a loaded resume checkpoint. ``on_step(step)``: called after every optimizer step;
    True stops the loop there ("stopped"). Returns {"step", "stopped", "elapsed"}.
    """
    d = dist_info or _Dist()
    model.to(device)
    if d.world > 1 and device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    loss_module: nn.Module = _LossModule(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        loss_module = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=True)
    groups = model.param_groups(cfg.lr, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    sched = PolyWarmup(cfg.iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.poly_power)
    step, elapsed = 0, 0.0
    if start is not None:
        model.load_trainable_state_dict({k: v.to(device) for k, v in start["model"].items()})
        opt.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["scheduler"])
        step, elapsed = int(start["step"]), float(start["elapsed"])
    per_rank = cfg.batch_size // cfg.grad_accum
    if per_rank % d.world:
        raise UserError(f"--batch-size {cfg.batch_size} with {cfg.grad_accum} accumulation steps does not split over {d.world} processes")
    sampler = StepBatches(len(dataset), cfg.seed, cfg.batch_size, cfg.grad_accum, d.rank, d.world, step, cfg.iters)
    from .data import collate

    loader = torch.utils.data.DataLoader(_EpochItems(dataset), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    if start is not None:
        set_rng_state(start["rng"])  # last: nothing above may draw from the global RNGs after this
    amp_dtype = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")) else None
    metrics_path = out / "metrics.jsonl" if out is not None else None
    bar = progress.task(f"train {cfg.method} {cfg.task}", cfg.iters, completed=step)
    batches = iter(loader)
    run_steps, stopped = 0, False
    t_log, n_log, t_seg = time.perf_counter(), 0, time.perf_counter()
    elapsed0 = elapsed
    try:
        while step < cfg.iters:
            if cfg.max_steps_this_run is not None and run_steps >= cfg.max_steps_this_run:
                stopped = True
                break
            sched.step_index = step
            sched.apply(opt)
            lr_now = max(g["lr"] for g in opt.param_groups)
            opt.zero_grad(set_to_none=True)
            parts: dict[str, float] = {}
            for a in range(cfg.grad_accum):
                batch = _to(next(batches), device)
                sync = contextlib.nullcontext() if (d.world == 1 or a == cfg.grad_accum - 1) else loss_module.no_sync()
                amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
                with sync:
                    with amp:
                        losses = loss_module(batch)
                    (losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            opt.step()
            step += 1
            run_steps += 1
            n_log += 1
            elapsed = elapsed0 + time.perf_counter() - t_seg
            if step % cfg.log_every == 0 or step == cfg.iters:
                if d.world > 1:
                    vals = torch.tensor(list(parts.values()), dtype=torch.float64)
                    torch.distributed.all_reduce(vals)
                    parts = dict(zip(parts, (vals / d.world).tolist()))
                now = time.perf_counter()
                rec = {"iter": step, **{k: round(v, 6) for k, v in parts.items()}, "lr": lr_now,
                       "it_s": round(n_log / max(now - t_log, 1e-9), 4), "time": round(elapsed, 3)}
                t_log, n_log = now, 0
                if metrics_path is not None and d.main:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
            bar.advance(1, loss=parts["loss"], lr=lr_now, it_s=run_steps / max(time.perf_counter() - t_seg, 1e-9))
            if out is not None and (step % cfg.checkpoint_every == 0 or step == cfg.iters):
                if d.main:
                    save_checkpoint(out / "last.pt", model_state=model.trainable_state_dict(), optimizer=opt,
                                    scheduler=sched, step=step, elapsed=elapsed, config=cfg.to_dict(),
                                    data={"seed": cfg.seed, "samples_seen": step * cfg.batch_size,
                                          "epoch": step * cfg.batch_size // len(dataset),
                                          "offset": step * cfg.batch_size % len(dataset)})
                d.barrier()
            if on_step is not None and on_step(step):
                stopped = True
                break
    finally:
        bar.close()
    return {"step": step, "stopped": stopped, "elapsed": elapsed}


def _check_resume(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    diff = [k for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"cannot resume: option {k} was {saved.get(k)!r} in the checkpoint and is {now[k]!r} now "
                        f"(also differs: {', '.join(diff[1:]) or 'nothing else'}); run with the same options")


def train(cfg: TrainConfig, progress: Progress = NULL_PROGRESS, *, backbone: Backbone | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; write OUT/{config.json, metrics.jsonl, last.pt, model.safetensors, eval.json}.

    ``backbone``: use this (pretrained) backbone instead of building ``cfg.model``/``cfg.weights``
    (API use and tests; it is deep-copied, and ``cfg.model`` is set to its name). A resumed run
    must be given the same backbone.

    Returns the final metrics (eval.json's content), or {"stopped_at": step} when
    ``max_steps_this_run`` stopped the run early (a resumable interruption).
    """
    from .data import build_dataset
    from .model import count_trainable

    if backbone is not None:
        cfg = dataclasses.replace(cfg, model=backbone.name, weights=cfg.weights or "given")
    cfg = resolve_config(cfg)
    d = _init_distributed(cfg.device)
    try:
        device = resolve_device(cfg.device, d)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        out = Path(cfg.out)
        ckpt = None
        if cfg.resume:
            ckpt = load_checkpoint(out / "last.pt")
        elif d.main and (out / "last.pt").exists():
            raise UserError(f"{out} already holds a training run: add --resume to continue it, or give another --out")
        seed_everything(cfg.seed)
        train_set = build_dataset(cfg.data, "train", task=cfg.task, crop=cfg.crop, augment=True,
                                  length=cfg.train_length, seed=cfg.seed)
        backbone = (copy.deepcopy(backbone) if backbone is not None else
                    build_backbone(cfg.model, cfg.weights, seed=cfg.seed if cfg.weights == "random" else None))
        _finish_split(cfg, backbone)
        if ckpt is not None:
            _check_resume(ckpt["config"], cfg)
        seed_everything(cfg.seed)
        model = build_model(cfg, backbone, train_set.num_classes)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            record = {**cfg.to_dict(), "weights_source": backbone.weights_source, "num_classes": train_set.num_classes,
                      "trainable_params": count_trainable(model), "world_size": d.world, "device_used": str(device),
                      "versions": versions(), "model_config": model.config()}
            atomic_write_json(out / "config.json", record)
            if ckpt is not None:
                _metrics_upto(out / "metrics.jsonl", int(ckpt["step"]))
            elif (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()
        d.barrier()
        progress.log(f"training {cfg.method} on {cfg.task}: {count_trainable(model):,} trainable parameters, "
                     f"{cfg.iters} iterations" + (f", resuming at step {ckpt['step']}" if ckpt else ""))
        state = fit(model, train_set, cfg, device=device, dist_info=d, out=out, progress=progress, start=ckpt)
        if state["stopped"]:
            return {"stopped_at": state["step"]}
        result: dict[str, Any] = {}
        if d.main:
            save_model(model, out / "model.safetensors", cfg.to_dict())
            if cfg.evaluate:
                from .evaluate import evaluate_model

                val = build_dataset(cfg.val_data or cfg.data, "val", task=cfg.task, crop=cfg.crop, augment=False,
                                    length=cfg.val_length, seed=cfg.seed)
                amp = torch.bfloat16 if device.type == "cuda" and cfg.precision != "fp32" else None
                result = evaluate_model(model, val, cfg.task, mode=cfg.eval_mode, crop=cfg.crop, stride=cfg.eval_stride,
                                        batch_size=cfg.eval_batch_size, device=device, autocast_dtype=amp, progress=progress)
            result = {**result, "iters": state["step"], "train_seconds": round(state["elapsed"], 3)}
            atomic_write_json(out / "eval.json", result)
        d.barrier()
        return result
    finally:
        if d.created:
            torch.distributed.destroy_process_group()


def finetune_backbone(backbone: Backbone, task: str, data_spec: str, steps: int, *, batch_size: int = 8, crop: int = 224,
                      lr: float | None = None, seed: int = 0, device: str = "auto", grad_accum: int = 1,
                      masks: bool = True, progress: Progress = NULL_PROGRESS,
                      on_step: Callable[[int, Backbone], bool] | None = None) -> Backbone:
    """A copy of ``backbone`` fine-tuned on ``task`` for ``steps`` steps (method "full": every
    backbone weight plus the baseline head, the trainer's recipe); ``backbone`` is left untouched.

    ``on_step(step, copy)``: called after every step with the copy being trained (in train mode);
    True stops the fine-tuning there (the schedule still spans ``steps``).

    The returned backbone is in eval mode, frozen, on ``device``; its ``weights_source`` says how
    it was made."""
    from .baselines import Baseline
    from .data import build_dataset

    if steps < 1:
        raise UserError(f"fine-tuning needs at least 1 step, got {steps}")
    cfg = resolve_config(TrainConfig(task=task, method="full", model=backbone.name, weights="given", data=data_spec,
                                     iters=steps, batch_size=batch_size, grad_accum=grad_accum, crop=crop, lr=lr,
                                     seed=seed, device=device, checkpoint_every=steps, log_every=max(1, steps),
                                     masks=masks))
    dev = resolve_device(cfg.device, _Dist())
    seed_everything(seed)
    data = build_dataset(data_spec, "train", task=task, crop=crop, augment=True, seed=seed)
    copy_bb = copy.deepcopy(backbone).cpu()
    model = Baseline(copy_bb, "full", task, data.num_classes, masks=cfg.masks,
                     det_preset=cfg.det_preset or det_preset_for(crop))
    done = fit(model, data, cfg, device=dev, progress=progress,
               on_step=None if on_step is None else (lambda step: on_step(step, copy_bb)))
    copy_bb.weights_source = (f"{backbone.weights_source} + full fine-tune on {task} ({data_spec}, {done['step']} "
                              f"{'of ' + str(steps) + ' ' if done['step'] != steps else ''}steps, seed {seed})")
    for p in copy_bb.parameters():
        p.requires_grad_(False)
    return copy_bb.eval()
