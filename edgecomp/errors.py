"""The one exception type for errors a user can cause and fix."""


class EdgecompError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The CLI prints the message on one line, without a traceback, and exits non-zero.
    """
