"""Small parsers shared by the commands (turn option strings into values, or a UserError), and
:func:`reuse_options` (one command taking another's options)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

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


def reuse_options(base: Callable[..., Any], *, drop: Sequence[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of another one: ``@reuse_options(train, drop=("out",))`` on
    ``def sweep(k_t: str = typer.Option(...), ..., **options)`` makes typer see sweep's own options
    followed by every option of ``train`` except those in ``drop`` and those sweep defines itself;
    the taken ones arrive in ``options`` by name. One definition of each option (name, default, help)."""
    base_sig = inspect.signature(base, eval_str=True)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in own} | set(drop)
        taken = [p for p in base_sig.parameters.values() if p.name not in names]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own + taken]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}  # evaluated types, not strings
        return command

    return decorate
