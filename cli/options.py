"""Small parsers shared by the commands (turn option strings into values, or a UserError)."""

from __future__ import annotations

import math
from typing import Callable

import typer

from vitsplit.errors import UserError


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    """'2,5,8,11' -> [2, 5, 8, 11] (no empty items; which values make sense is the model's rule)."""
    if text is None:
        return None
    items = text.replace(" ", "").split(",")
    if "" in items:
        raise UserError(f"{option} '{text}' has an empty item; give comma-separated integers such as 2,5,8,11")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers such as 2,5,8,11, not '{text}'") from None


def parse_task_map(items: list[str] | None, option: str) -> dict[str, str]:
    """['seg=a.pth', 'det=b.pth'] -> {'seg': 'a.pth', 'det': 'b.pth'}."""
    out: dict[str, str] = {}
    for item in items or []:
        task, sep, value = item.partition("=")
        if not sep or not task or not value:
            raise UserError(f"{option} takes TASK=VALUE (e.g. seg=model.pth), not '{item}'")
        if task in out:
            raise UserError(f"{option} names task '{task}' twice")
        out[task] = value
    return out


# ------------------------------------------------------------------ numbers, checked while parsing
# typer callbacks: a bad number stops the command before any work, as "Invalid value for '--lr': ...".
# None (an option left to its default) always passes.
def at_least(bound: int) -> Callable[[int | None], int | None]:
    """An integer option that must be >= ``bound``."""

    def check(value: int | None) -> int | None:
        if value is not None and value < bound:
            raise typer.BadParameter(f"must be at least {bound}, got {value}")
        return value

    return check


def finite(*, above: float | None = None, at_least: float | None = None) -> Callable[[float | None], float | None]:
    """A float option that must be finite (not nan or inf) and ``> above`` / ``>= at_least``."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, got {value}")
        if above is not None and not value > above:
            raise typer.BadParameter(f"must be greater than {above:g}, got {value:g}")
        if at_least is not None and not value >= at_least:
            raise typer.BadParameter(f"must be at least {at_least:g}, got {value:g}")
        return value

    return check


COUNT = at_least(1)  # steps, images, pixels, ranks: one or more
NON_NEGATIVE = at_least(0)  # seeds, worker processes, warm-up steps, optional counts
POSITIVE_NUMBER = finite(above=0)  # learning rates, parameter budgets
NON_NEGATIVE_NUMBER = finite(at_least=0)  # weight decay
