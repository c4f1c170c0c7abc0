"""The one error type for user mistakes: the CLI prints its message on one line and exits 2."""


class EbrError(Exception):
    """Bad input or a missing prerequisite; the message says what to fix."""
