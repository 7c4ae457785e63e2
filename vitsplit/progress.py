"""Progress reporting without a UI dependency.

Library code never prints: long loops take a ``progress`` argument (a :class:`Progress`) and call
``task = progress.task("what", total)``, ``task.advance(n, **fields)``, ``task.close()``. The CLI
passes a rich implementation (``cli/progress.py``); the default does nothing.
"""

from __future__ import annotations

from typing import Any


class ProgressTask:
    """One bar. ``fields`` are shown next to it (loss, lr, ...)."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "ProgressTask":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Progress:
    """Factory of progress bars; this base class shows nothing."""

    def task(self, description: str, total: int | None = None, completed: int = 0) -> ProgressTask:
        return ProgressTask()

    def log(self, message: str) -> None:
        """A line for the person watching (e.g. 'saved checkpoint at step 200')."""


NULL_PROGRESS = Progress()
