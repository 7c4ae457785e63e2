"""The one exception type for errors a user can fix.

Library code raises :class:`UserError` with a message that says what is wrong and what to do;
the CLI turns it into one line on stderr and exit code 2. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input (names, files, options, data), not with the code."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run that can be resumed: where it stopped and what is saved.

    A :class:`KeyboardInterrupt` (code that catches that still does); ``step`` is the number of steps
    done, ``checkpoint`` the resume file and ``checkpoint_step`` its step, both None when no
    checkpoint was written (then there is nothing to resume)."""

    def __init__(self, what: str, step: int, total: int, checkpoint: str | None, checkpoint_step: int | None):
        super().__init__(what)
        self.what, self.step, self.total = what, step, total
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step

    def describe(self) -> str:
        """One line: what stopped where, and where the last checkpoint is."""
        where = f"{self.what} stopped at step {self.step} of {self.total}"
        if self.checkpoint is None:
            return f"{where}, before its first checkpoint: nothing to resume"
        return f"{where}; the last checkpoint is {self.checkpoint} (step {self.checkpoint_step})"
