"""Learning-rate schedule of the ViT-Split release: poly decay with a linear warm-up.

Source: mmcv 1.4's ``PolyLrUpdaterHook`` (power 0.9, min lr 0, by iteration) with
``warmup='linear', warmup_iters=1500, warmup_ratio=1e-6`` (the ViT-Split release's setting,
``docs/configurations.md``). mmcv
computes the poly lr first and then scales it during warm-up:

    poly(s)   = (1 - s / iters) ** power                         (times the base lr; min lr 0)
    warm(s)   = 1 - (1 - s / warmup) * (1 - ratio)                for s < warmup, else 1
    factor(s) = poly(s) * warm(s)

``s`` is the 0-based index of the step being taken (the first step uses ``ratio * base lr``).

Warm-up length rule (ours): ``min(1500, iters // 10)``. 1500 is the published value for 40k
iterations; a short run (a test, a quick fine-tune) would otherwise spend all of its steps
warming up, so warm-up is capped at a tenth of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PUBLISHED_WARMUP = 1500


def default_warmup(iters: int) -> int:
    """Warm-up iterations for a run of ``iters`` steps: ``min(1500, iters // 10)``."""
    return min(PUBLISHED_WARMUP, max(0, int(iters)) // 10)


def lr_factor(step: int, iters: int, warmup: int, ratio: float = 1e-6, power: float = 0.9) -> float:
    """Multiplier of the base lr at 0-based step ``step`` (see the module docstring)."""
    poly = max(0.0, 1.0 - step / max(1, iters)) ** power
    if warmup > 0 and step < warmup:
        poly *= 1.0 - (1.0 - step / warmup) * (1.0 - ratio)
    return poly


@dataclass
class PolyWarmup:
    """Sets each optimizer group's lr to ``base_lr * lr_factor(step)``.

    Groups keep their own base lr (``group["base_lr"]``, set on the first call), so the task head's
    x0.1 survives the schedule. ``state_dict``/``load_state_dict`` make it resumable.
    """

    iters: int
    warmup: int
    ratio: float = 1e-6
    power: float = 0.9
    step_index: int = 0

    def factor(self, step: int | None = None) -> float:
        return lr_factor(self.step_index if step is None else step, self.iters, self.warmup, self.ratio, self.power)

    def apply(self, optimizer: Any) -> float:
        """Set the lrs for step ``step_index``; returns the factor."""
        f = self.factor()
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * f
        return f

    def advance(self) -> None:
        self.step_index += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "iters": self.iters,
            "warmup": self.warmup,
            "ratio": self.ratio,
            "power": self.power,
            "step_index": self.step_index,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("iters", "warmup", "ratio", "power", "step_index"):
            setattr(self, k, state[k])
