"""The allowed values of a numeric option, one :class:`Range` per option, defined once beside its
config (``vitsplit.engine.config.TRAIN_RANGES``, ``cka_split.pipelines.analyze.ANALYZE_RANGES``, ...) and checked
twice from that one definition: by the library when a config is resolved (API callers), and by the
CLI while it parses the command line, before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Range:
    """A finite number ``>= at_least`` and/or ``> above`` (an integer option gets integer bounds)."""

    at_least: float | None = None
    above: float | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` is not allowed (``"must be ..., got ..."``), or None if it is."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.at_least is not None and value < self.at_least:
            return f"must be at least {self.at_least:g}, got {value:g}"
        if self.above is not None and not value > self.above:
            return f"must be greater than {self.above:g}, got {value:g}"
        return None

    def check(self, option: str, value: float | None) -> None:
        """UserError naming ``option`` if ``value`` (None: left to its default) is not allowed."""
        problem = None if value is None else self.problem(value)
        if problem is not None:
            raise UserError(f"{option} {problem}")


COUNT = Range(at_least=1)  # steps, images, pixels, blocks, ranks: one or more
NON_NEGATIVE = Range(at_least=0)  # seeds, worker processes, warm-up steps, weight decay
POSITIVE = Range(above=0)  # learning rates, parameter budgets
