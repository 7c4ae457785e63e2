"""``--finetune-steps auto``: fine-tune a task copy only until its recommendation has settled.

Every ``every`` steps the copy's CKA against the pretrained model is measured on a small fixed probe
set (:func:`cka_split.analysis.analyze`), the divergence rule gives a K_t
(:func:`cka_split.recommend.recommend_split`, K_t from CKA, no budget), and the fine-tuning stops
once K_t has been the same at ``patience`` consecutive checks after the one where it first took that
value (so ``patience + 1`` equal checks in a row), or at ``max_steps``. The learning-rate schedule
spans ``max_steps`` either way, so an early stop happens before the learning rate has decayed: the copy
is a copy partway through fine-tuning, which is all the CKA needs (where the task changes the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class StabilityStop:
    """The stopping rule alone: feed it (step, K_t) at every check; it says when to stop."""

    every: int
    patience: int
    trajectory: list[tuple[int, int]] = field(default_factory=list)   # (step, K_t) per check
    stopped_at: int | None = None                                      # the step of the stopping check

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1:
            raise ValueError(f"every ({self.every}) and patience ({self.patience}) must be at least 1")

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def observe(self, step: int, k_t: int) -> bool:
        """Record one check; True when K_t has not changed for ``patience`` checks."""
        self.trajectory.append((int(step), int(k_t)))
        last = [k for _, k in self.trajectory[-(self.patience + 1):]]
        if len(last) == self.patience + 1 and len(set(last)) == 1:
            self.stopped_at = int(step)
            return True
        return False

    def to_json(self, max_steps: int, steps_used: int) -> dict:
        return {"max_steps": max_steps, "check_every": self.every, "patience": self.patience, "steps_used": steps_used,
                "stopped_early": steps_used < max_steps, "k_t_trajectory": [list(p) for p in self.trajectory]}


def stability_callback(pretrained: nn.Module, task: str, probes: Sequence[torch.Tensor], stop: StabilityStop, *,
                       num_layers: int, features: str = "tokens",
                       unbiased: bool = True) -> Callable[[int, nn.Module], bool]:
    """``on_step(step, copy)`` for :func:`vitsplit.engine.finetune_backbone`: at every ``stop.every``
    steps, the K_t of ``copy`` on the probe minibatches ``probes`` (each (B, 3, H, W), B >= 4)."""
    from .analysis import analyze
    from .recommend import recommend_split

    def on_step(step: int, copy: nn.Module) -> bool:
        if not stop.due(step):
            return False
        res = analyze({"pretrained": pretrained, task: copy}, probes, features=features, unbiased=unbiased)
        k = recommend_split(res, tasks=[task], num_layers=num_layers).per_task[task].k_t_from_cka
        return stop.observe(step, k)

    return on_step
