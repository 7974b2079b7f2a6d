"""The one error type users see."""

from __future__ import annotations


class CryorefineError(Exception):
    """The input files or options are wrong.

    The message is one line that names the file or option and says what is wrong;
    ``cryorefine.cli.main`` prints it and exits with status 2. Any other exception is
    a bug and keeps its traceback. A message that quotes another library's multi-line
    error is folded onto one line.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


class CryorefineWarning(UserWarning):
    """Something the user should know that does not stop the run (printed as one line)."""
