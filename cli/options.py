"""Small parsers shared by the commands (turn option strings into values, or a UserError), and
:func:`reuse_options` (one command taking another's options)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import typer

from vitsplit.errors import UserError
from vitsplit.ranges import Range


def parse_layer_list(text: str | None, option: str) -> list[int] | None:
    """'2,5,8,11' -> [2, 5, 8, 11]: block indices as typed by a user, each once, none empty or negative
    (the model checks them against its depth). A repeat is refused here, not in the model: the
    published ViT-g default samples block 27 twice, but a user who types a block twice made a typo."""
    if text is None:
        return None
    items = text.replace(" ", "").split(",")
    if "" in items:
        raise UserError(f"{option} '{text}' has an empty item; give comma-separated block indices such as 2,5,8,11")
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers such as 2,5,8,11, not '{text}'") from None
    for v in values:
        if v < 0:
            raise UserError(f"{option} '{text}' has {v}; block indices start at 0")
        if values.count(v) > 1:
            raise UserError(f"{option} '{text}' lists block {v} twice; give each block once")
    return values


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
def checked(allowed: Range) -> Callable[[float | None], float | None]:
    """A typer callback refusing what ``allowed`` refuses, while the command line is parsed: the
    error reads "Invalid value for '--lr': must be greater than 0, got -1" and no work has started."""

    def check(value: float | None) -> float | None:
        problem = None if value is None else allowed.problem(value)
        if problem is not None:
            raise typer.BadParameter(problem)
        return value

    return check


def reuse_options(
    base: Callable[..., Any], *, drop: Sequence[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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
