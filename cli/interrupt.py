"""Ctrl-C: one line on stderr saying what was interrupted, and for a run that can resume, where its
last checkpoint is and the exact command that resumes it."""

from __future__ import annotations

import shlex

from vitsplit.errors import RunInterrupted


class Interrupted(Exception):
    """A command's :class:`RunInterrupted`, carried past typer (which turns a KeyboardInterrupt into a
    bare exit code 130) to :func:`cka_split.cli.app.main`."""

    def __init__(self, run: RunInterrupted):
        super().__init__(run.describe())
        self.run = run


def interrupted_line(argv: list[str], run: RunInterrupted | None) -> str:
    """``cka-split: interrupted: ...`` for the command line ``argv`` (without the program name)."""
    command = next((a for a in argv if not a.startswith("-")), "cka-split")
    if run is None:
        return f"cka-split: interrupted: {command}"
    if run.checkpoint is None:
        return f"cka-split: interrupted: {run.describe()}"
    resume = argv if "--resume" in argv else [*argv, "--resume"]
    return f"cka-split: interrupted: {run.describe()}; resume with: {shlex.join(['cka-split', *resume])}"
