"""Ctrl-C: one line on stderr saying what was interrupted, and for a run that can resume, where its
last checkpoint is and the exact command that resumes it."""

from __future__ import annotations

import shlex

from vitsplit.errors import RunInterrupted


class Interrupted(Exception):
    """A command's :class:`RunInterrupted`, carried past typer (which turns a KeyboardInterrupt into a
    bare exit code 130) to :func:`cka_split.cli.app.main`."""

    def __init__(self, run: RunInterrupted, resume_flag: str | None = "--resume"):
        """``resume_flag``: the option that makes the same command line resume (None: running the same
        command again resumes, as ``sweep`` does)."""
        super().__init__(run.describe())
        self.run, self.resume_flag = run, resume_flag


def interrupted_line(argv: list[str], error: Interrupted | None) -> str:
    """``cka-split: interrupted: ...`` for the command line ``argv`` (without the program name)."""
    command = next((a for a in argv if not a.startswith("-")), "cka-split")
    if error is None:
        return f"cka-split: interrupted: {command}"
    run = error.run
    if run.checkpoint is None:
        return f"cka-split: interrupted: {run.describe()}"
    flag = error.resume_flag
    resume = argv if flag is None or flag in argv else [*argv, flag]
    return f"cka-split: interrupted: {run.describe()}; resume with: {shlex.join(['cka-split', *resume])}"
