"""Rich rendering of :class:`vitsplit.progress.Progress` for the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichBar,
)

from vitsplit.progress import Progress, ProgressTask

console = Console(stderr=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class _RichTask(ProgressTask):
    def __init__(self, bar: RichBar, task_id: int, keep: bool = True):
        self.bar, self.task_id, self.keep = bar, task_id, keep

    def advance(self, n: int = 1, **fields: Any) -> None:
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self.bar.update(self.task_id, advance=n, info=info)

    def close(self) -> None:
        self.bar.stop_task(self.task_id)
        if not self.keep:
            self.bar.remove_task(self.task_id)


class RichProgress(Progress):
    """Use as a context manager around the work: ``with RichProgress() as p: lib_call(progress=p)``.

    ``keep_finished=False`` removes each bar when it closes (a sweep's dozens of training runs)."""

    def __init__(self, enabled: bool = True, keep_finished: bool = True):
        self.keep_finished = keep_finished
        self.bar = RichBar(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.speed}" if False else ""),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.started = False

    def __enter__(self) -> "RichProgress":
        self.started = False  # the live display starts with the first bar, so that an early user
        return self  # error leaves stderr with its one line and nothing else

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.bar.stop()

    def task(self, description: str, total: int | None = None, completed: int = 0) -> ProgressTask:
        if not self.started:
            self.bar.start()
            self.started = True
        return _RichTask(
            self.bar, self.bar.add_task(description, total=total, completed=completed, info=""), keep=self.keep_finished
        )

    def log(self, message: str) -> None:
        self.bar.console.log(message)
