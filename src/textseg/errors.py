"""One exception type for every user-facing failure.

The CLI catches :class:`TextsegError` and prints its message on one line (exit code 2) instead of a
traceback; library users can catch it too. Raise it with a message that says what was wrong and
what to do about it.
"""


class TextsegError(Exception):
    """A bad input, file or configuration, explained in one line."""


class CheckpointError(TextsegError):
    """A weights file that is missing, truncated, or not of the expected model."""


class ImageError(TextsegError):
    """An image that cannot be read or decoded."""
