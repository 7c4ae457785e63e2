"""The training loop (:func:`fit`): AdamW, the poly schedule, gradient accumulation, autocast, DDP,
metrics.jsonl and the resume checkpoint ``last.pt``.

With RNG states, optimizer and schedule in ``OUT/last.pt`` (:mod:`vitsplit.engine.checkpoint`) and
the data order a function of (seed, step) (:mod:`vitsplit.engine.sampler`), a resumed run ends
bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data import collate
from ..device import train_autocast_dtype
from ..errors import RunInterrupted, UserError
from ..progress import NULL_PROGRESS, Progress
from .checkpoint import save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import Dist
from .sampler import EpochItems, StepBatches
from .schedule import PolyWarmup


class _LossModule(nn.Module):
    """What DDP wraps: ``forward(batch) = model.loss(batch)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (
            v.to(device, non_blocking=True)
            if torch.is_tensor(v)
            else [t.to(device) for t in v]
            if isinstance(v, list)
            else v
        )
        for k, v in batch.items()
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _diverged(
    step: int,
    loss: float | None,
    lr: float,
    checkpoint: Path | None,
    checkpoint_step: int | None,
    cause: str | None = None,
) -> UserError:
    """The error that stops a run whose loss (or update) stopped being a number at ``step``."""
    what = cause or f"the loss is {loss} at step {step}"
    saved = (
        f"the last good checkpoint is {checkpoint} (step {checkpoint_step})"
        if checkpoint is not None
        else "no checkpoint was written before it"
    )
    return UserError(
        f"training diverged: {what} (lr {lr:.3g}); {saved}; lower --lr (or lengthen --warmup-iters) and train again"
    )


def _all_finite(value: float, d: Dist) -> bool:
    """Whether ``value`` is finite on every process (each rank sees its own micro-batches' loss)."""
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0])
    if d.world > 1:
        torch.distributed.all_reduce(bad)
    return bool(bad.item() == 0)


def fit(
    model: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    *,
    device: torch.device,
    dist_info: Dist | None = None,
    out: Path | None = None,
    progress: Progress = NULL_PROGRESS,
    start: dict[str, Any] | None = None,
    on_step: Callable[[int], bool] | None = None,
) -> dict[str, Any]:
    """The training loop. Writes metrics.jsonl and last.pt under ``out`` (rank 0) when ``out`` is given.

    ``start``: a loaded resume checkpoint. ``on_step(step)``: called after every optimizer step;
    True stops the loop there ("stopped"). Returns {"step", "stopped", "elapsed"}.

    A loss that is NaN or infinite (or an update that overflows float32) stops the run before the
    optimizer applies it, with a UserError naming the step and the last good checkpoint; nothing
    non-finite is logged. Ctrl-C raises :class:`~vitsplit.errors.RunInterrupted` with the step reached
    and the last checkpoint written (the resumed run's own, if none was written since).
    """
    d = dist_info or Dist()
    model.to(device)
    if d.world > 1 and device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    loss_module: nn.Module = _LossModule(model)
    if d.world > 1:
        loss_module = DDP(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    scale = {} if cfg.pretrained_lr_scale is None else {"pretrained_lr_scale": cfg.pretrained_lr_scale}
    groups = model.param_groups(cfg.lr, cfg.weight_decay, **scale)
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
        raise UserError(
            f"--batch-size {cfg.batch_size} with {cfg.grad_accum} accumulation steps does not split over {d.world} "
            f"processes"
        )
    sampler = StepBatches(len(dataset), cfg.seed, cfg.batch_size, cfg.grad_accum, d.rank, d.world, step, cfg.iters)
    loader = torch.utils.data.DataLoader(
        EpochItems(dataset),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if start is not None:
        set_rng_state(start["rng"])  # last: nothing above may draw from the global RNGs after this
    amp_dtype = train_autocast_dtype(cfg.precision, device)
    metrics_path = out / "metrics.jsonl" if out is not None else None
    bar = progress.task(f"train {cfg.method} {cfg.task}", cfg.iters, completed=step)
    batches = iter(loader)
    run_steps, stopped = 0, False
    checkpoint = out / "last.pt" if out is not None and start is not None else None
    checkpoint_step = int(start["step"]) if start is not None else None
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
                amp = (
                    torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
                )
                with sync:
                    with amp:
                        losses = loss_module(batch)
                    (losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if not _all_finite(parts["loss"], d):
                raise _diverged(step + 1, parts["loss"], lr_now, checkpoint, checkpoint_step)
            try:
                opt.step()
            except RuntimeError as e:  # AdamW's step size lr / (1 - beta1^t) overflows float32 for a huge lr
                if "overflow" not in str(e):
                    raise
                raise _diverged(
                    step + 1,
                    None,
                    lr_now,
                    checkpoint,
                    checkpoint_step,
                    cause=f"the update of step {step + 1} overflows float32",
                ) from None
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
                rec = {
                    "iter": step,
                    **{k: round(v, 6) for k, v in parts.items()},
                    "lr": lr_now,
                    "it_s": round(n_log / max(now - t_log, 1e-9), 4),
                    "time": round(elapsed, 3),
                }
                t_log, n_log = now, 0
                if metrics_path is not None and d.main:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
            bar.advance(1, loss=parts["loss"], lr=lr_now, it_s=run_steps / max(time.perf_counter() - t_seg, 1e-9))
            if out is not None and (step % cfg.checkpoint_every == 0 or step == cfg.iters):
                if d.main:
                    save_checkpoint(
                        out / "last.pt",
                        model_state=model.trainable_state_dict(),
                        optimizer=opt,
                        scheduler=sched,
                        step=step,
                        elapsed=elapsed,
                        config=cfg.to_dict(),
                        data={
                            "seed": cfg.seed,
                            "samples_seen": step * cfg.batch_size,
                            "epoch": step * cfg.batch_size // len(dataset),
                            "offset": step * cfg.batch_size % len(dataset),
                        },
                    )
                checkpoint, checkpoint_step = out / "last.pt", step
                d.barrier()
            if on_step is not None and on_step(step):
                stopped = True
                break
    except KeyboardInterrupt as e:
        raise RunInterrupted(
            f"train {cfg.method} {cfg.task}",
            step,
            cfg.iters,
            None if checkpoint is None else str(checkpoint),
            checkpoint_step,
        ) from e
    finally:
        bar.close()
    return {"step": step, "stopped": stopped, "elapsed": elapsed}
