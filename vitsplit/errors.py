"""The one exception type for errors a user can fix.

Library code raises :class:`UserError` with a message that says what is wrong and what to do;
the CLI turns it into one line on stderr and exit code 2. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input (names, files, options, data), not with the code."""
