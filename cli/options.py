"""Small parsers shared by the commands (turn option strings into values, or a UserError)."""

from __future__ import annotations

from vitsplit.errors import UserError


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    """'2,5,8,11' -> [2, 5, 8, 11]."""
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
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
