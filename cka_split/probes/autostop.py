"""``--finetune-steps auto``: fine-tune a task copy only until its recommendation has settled.

Every ``every`` steps the copy's CKA against the pretrained model is measured on a small fixed probe
set (:func:`cka_split.estimator.analysis.analyze`), and the divergence rule gives a K_t
(:func:`cka_split.decision.recommend.recommend_split`, K_t from CKA, no budget) together with every K_t whose
start the rule's step test accepts (``accepted_k_t``, :func:`cka_split.decision.divergence.accepted_starts`):
where two starts both pass (every later block diverges at least ``STEP_RATIO`` times more than every earlier one, beyond
noise),
the rule's choice between them follows whichever ratio is larger, and that flips from check to check
with the probe noise and the copy's progress. Measured on the demo's seg copy (64 probes, a check every
10 steps): the starts at blocks 1 and 2 both pass at 12 of 15 checks (ratios 2.0-3.6), and the chosen
K_t went 11, 11, 10, 10, 11, 11, 11, 10, 11, 11, 11, 10, 10, 10, 10: "the same K_t four checks in a row"
held only at the last check.

The copy is *settled* once the set of accepted K_t has been the same at ``patience`` consecutive checks
after the one where it first took that value (``patience + 1`` equal sets in a row); without a tie that
is the K_t itself staying put. It stops then, or at ``max_steps``. The set adds no constant to the rule:
it is the rule's own step test, read for every candidate instead of only the best. The learning-rate
schedule spans ``max_steps`` either way, so an early stop happens before the learning rate has decayed:
the copy is a copy partway through fine-tuning, which is all the CKA needs (where the task changes the
model). The final recommendation is the rule's, on the full probe set, as without ``auto``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class StabilityStop:
    """The stopping rule alone: feed it (step, K_t, accepted K_t) at every check; it says when to stop."""

    every: int
    patience: int
    trajectory: list[tuple[int, int]] = field(default_factory=list)  # (step, K_t) per check
    accepted: list[list[int]] = field(default_factory=list)  # the accepted K_t per check (ascending)
    stopped_at: int | None = None  # the step of the stopping check

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1:
            raise ValueError(f"every ({self.every}) and patience ({self.patience}) must be at least 1")

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def observe(self, step: int, k_t: int, accepted: Sequence[int] | None = None) -> bool:
        """Record one check; True when the accepted K_t (default: just ``k_t``) have not changed for
        ``patience`` checks."""
        self.trajectory.append((int(step), int(k_t)))
        self.accepted.append(sorted({int(k) for k in accepted} | {int(k_t)}) if accepted else [int(k_t)])
        last = self.accepted[-(self.patience + 1) :]
        if len(last) == self.patience + 1 and all(a == last[0] for a in last):
            self.stopped_at = int(step)
            return True
        return False

    def to_json(self, max_steps: int, steps_used: int) -> dict:
        return {
            "max_steps": max_steps,
            "check_every": self.every,
            "patience": self.patience,
            "steps_used": steps_used,
            "stopped_early": steps_used < max_steps,
            "k_t_trajectory": [list(p) for p in self.trajectory],
            "accepted_k_t": [list(a) for a in self.accepted],
        }


def stability_callback(
    pretrained: nn.Module,
    task: str,
    probes: Sequence[torch.Tensor],
    stop: StabilityStop,
    *,
    num_layers: int,
    features: str = "tokens",
    unbiased: bool = True,
) -> Callable[[int, nn.Module], bool]:
    """``on_step(step, copy)`` for :func:`vitsplit.engine.finetune_backbone`: at every ``stop.every``
    steps, the K_t of ``copy`` on the probe minibatches ``probes`` (each (B, 3, H, W), B >= 4)."""
    from cka_split.decision.recommend import recommend_split
    from cka_split.estimator.analysis import analyze

    def on_step(step: int, copy: nn.Module) -> bool:
        if not stop.due(step):
            return False
        res = analyze({"pretrained": pretrained, task: copy}, probes, features=features, unbiased=unbiased)
        rec = recommend_split(res, tasks=[task], num_layers=num_layers).per_task[task]
        return stop.observe(step, rec.k_t_from_cka, rec.accepted_k_t)

    return on_step
