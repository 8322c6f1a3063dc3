"""The one error type a user should ever see.

`UserError` means "your input or usage is wrong, here is how to fix it": the CLI prints
its message (one line per problem) and exits with code 2, with no traceback. Anything
else that escapes is a bug in tunesmith and exits 1.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or usage; `problems` holds one line per problem (``file:line: what``)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems or [])

    def lines(self) -> list[str]:
        """The lines to print on stderr: the headline, then each problem."""
        return [str(self), *self.problems]
