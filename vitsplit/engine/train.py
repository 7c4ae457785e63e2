"""``train(cfg)``: one trainer for every task (seg, det, depth) and method (vitsplit, linear, full, lora, vit-adapter).

Recipe (the ViT-Split release, ``docs/configurations.md``): AdamW betas (0.9, 0.999), weight decay
1e-2 on every trainable parameter (0.05 for detection, the published Mask R-CNN setting), the task
head (pretrained-initialised weights) at lr x 0.1, poly 0.9 with linear warm-up
(:mod:`vitsplit.engine.schedule`), gradient accumulation, bf16 autocast on CUDA. Every method gets
the same data (:mod:`vitsplit.engine.sampler`), schedule and logging (:mod:`vitsplit.engine.loop`).

A run writes ``OUT/config.json``, ``metrics.jsonl``, ``last.pt`` (resume), ``model.safetensors``
(:mod:`vitsplit.model.artefact`) and ``eval.json`` (``docs/run-directory.md``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import Backbone, build_backbone
from ..data import build_dataset
from ..device import eval_autocast_dtype, resolve_device
from ..errors import UserError
from ..evaluation import evaluate_model
from ..fileio import atomic_write_json, atomic_write_text, versions
from ..model import count_trainable, save_trained
from ..model.build import build_model as model_build
from ..model.heads import DepthHead, det_preset_for
from ..progress import NULL_PROGRESS, Progress
from ..runlock import RunLock
from .checkpoint import load_checkpoint
from .config import RESUME_FREE, TrainConfig, finish_config, resolve_config, with_implicit_options
from .distributed import Dist, init_distributed
from .loop import fit, seed_everything
from .memory import PeakMemory

# eval.json fields that measure the machine, not the result (two identical runs differ only in these)
MEASURED = ("train_seconds", "step_time_s", "peak_memory_mb", "peak_memory_kind", "peak_memory_scope")


def build_model(cfg: TrainConfig, backbone: Backbone, num_classes: int) -> nn.Module:
    """ViT-Split, a baseline or ViT-Adapter on ``backbone`` (which the model takes over)."""
    return model_build(
        cfg.method,
        backbone,
        cfg.task,
        num_classes,
        k_t=cfg.k_t,
        prior_layers=cfg.prior_layers,
        masks=cfg.masks,
        det_preset=cfg.det_preset or det_preset_for(cfg.crop),
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        head=cfg.head,
    )


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


def _check_resume(saved: dict[str, Any], cfg: TrainConfig) -> None:
    saved, now = with_implicit_options(saved), cfg.to_dict()
    diff = [k for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(
            f"cannot resume: option {k} was {saved.get(k)!r} in the checkpoint and is {now[k]!r} now "
            f"(also differs: {', '.join(diff[1:]) or 'nothing else'}); run with the same options"
        )


def train(cfg: TrainConfig, progress: Progress = NULL_PROGRESS, *, backbone: Backbone | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; write OUT/{config.json, metrics.jsonl, last.pt, model.safetensors, eval.json}.

    ``backbone``: use this (pretrained) backbone instead of building ``cfg.model``/``cfg.weights``
    (API use and tests; it is deep-copied, and ``cfg.model`` is set to its name). A resumed run
    must be given the same backbone.

    Returns the final metrics (eval.json's content), or {"stopped_at": step} when
    ``max_steps_this_run`` stopped the run early (a resumable interruption).
    """
    if backbone is not None:
        cfg = dataclasses.replace(cfg, model=backbone.name, weights=cfg.weights or "given")
    cfg = resolve_config(cfg)
    d = init_distributed(cfg.device)
    try:
        device = resolve_device(cfg.device, d.local_rank if d.world > 1 else None)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0 owns OUT for the whole run (another job on it is refused, naming it)
        with RunLock(cfg.out) if d.main else contextlib.nullcontext() as lock:
            if lock is not None and lock.took_over():
                progress.log(lock.took_over())
            return _train_locked(cfg, d, device, progress, backbone)
    finally:
        if d.created:
            torch.distributed.destroy_process_group()


def _train_locked(
    cfg: TrainConfig, d: Dist, device: torch.device, progress: Progress, backbone: Backbone | None
) -> dict[str, Any]:
    """The run, once OUT is ours. A fresh run that fails or is interrupted before its first checkpoint
    leaves nothing behind (no lone config.json); one with a checkpoint keeps it and its records."""
    memory = PeakMemory(device)
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(out / "last.pt")
    elif d.main and (out / "last.pt").exists():
        raise UserError(f"{out} already holds a training run: add --resume to continue it, or give another --out")
    seed_everything(cfg.seed)
    train_set = build_dataset(
        cfg.data, "train", task=cfg.task, crop=cfg.crop, augment=True, length=cfg.train_length, seed=cfg.seed
    )
    backbone = (
        copy.deepcopy(backbone)
        if backbone is not None
        else build_backbone(cfg.model, cfg.weights, seed=cfg.seed if cfg.weights == "random" else None)
    )
    finish_config(cfg, backbone)
    if ckpt is not None:
        _check_resume(ckpt["config"], cfg)
    seed_everything(cfg.seed)
    model = build_model(cfg, backbone, train_set.num_classes)
    if cfg.task == "depth" and ckpt is None:  # a resumed run loads its head from the checkpoint
        log_depth = train_set.mean_log_depth()
        for m in model.modules():
            if isinstance(m, DepthHead):
                m.start_at(log_depth)
    try:
        if d.main:
            record = {
                **cfg.to_dict(),
                "weights_source": backbone.weights_source,
                "num_classes": train_set.num_classes,
                "trainable_params": count_trainable(model),
                "world_size": d.world,
                "device_used": str(device),
                "versions": versions(),
                "model_config": model.config(),
            }
            atomic_write_json(out / "config.json", record)
            if ckpt is not None:
                _metrics_upto(out / "metrics.jsonl", int(ckpt["step"]))
            elif (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()
        d.barrier()
        progress.log(
            f"training {cfg.method} on {cfg.task}: {count_trainable(model):,} trainable parameters, "
            f"{cfg.iters} iterations" + (f", resuming at step {ckpt['step']}" if ckpt else "")
        )
        state = fit(model, train_set, cfg, device=device, dist_info=d, out=out, progress=progress, start=ckpt)
    except BaseException:
        if d.main and ckpt is None and not (out / "last.pt").exists():
            for name in ("config.json", "metrics.jsonl"):
                (out / name).unlink(missing_ok=True)
        raise
    if state["stopped"]:
        return {"stopped_at": state["step"]}
    peak = memory.record(d)
    result: dict[str, Any] = {}
    if d.main:
        save_trained(model, out / "model.safetensors", cfg.to_dict())
        if cfg.evaluate:
            val = build_dataset(
                cfg.val_data or cfg.data,
                "val",
                task=cfg.task,
                crop=cfg.crop,
                augment=False,
                length=cfg.val_length,
                seed=cfg.seed,
            )
            amp = eval_autocast_dtype(cfg.precision, device)
            result = evaluate_model(
                model,
                val,
                cfg.task,
                mode=cfg.eval_mode,
                crop=cfg.crop,
                stride=cfg.eval_stride,
                batch_size=cfg.eval_batch_size,
                device=device,
                autocast_dtype=amp,
                progress=progress,
            )
        result = {
            **result,
            "iters": state["step"],
            "train_seconds": round(state["elapsed"], 3),
            "step_time_s": round(state["elapsed"] / max(state["step"], 1), 6),
            **peak,
        }
        atomic_write_json(out / "eval.json", result)
    d.barrier()
    return result
